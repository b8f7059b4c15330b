// The scoring ledger refuses what the legality rules forbid (ENGINEERING §7).
#include <gtest/gtest.h>

#include <atomic>

#include "eval/ledger.h"
#include "eval_fixture.h"

using namespace pgolf;
using namespace pgolf::test;

namespace {

const std::vector<float> kLosses(64, 0.5f);
std::span<const float> losses(size_t n) { return std::span<const float>(kLosses).first(n); }

}  // namespace

TEST(ScoringLedger, CountsLossTargetsAndBytesOnce) {
  const std::vector<uint16_t> s = audit_stream();
  const ByteTables t = made_up_tables(kEvalVocab);
  ScoringLedger ledger(s, t, ScoringLedger::Policy::ScoreFirst);
  ledger.score(10, losses(5));
  ledger.score(0, losses(3));
  EXPECT_DOUBLE_EQ(ledger.local_sums().loss_sum, 4.0);
  EXPECT_EQ(ledger.local_sums().tokens, 8.0);
  int64_t bytes = 0;
  for (int64_t i : {0, 1, 2, 10, 11, 12, 13, 14}) bytes += t.bytes(s[static_cast<size_t>(i)], s[static_cast<size_t>(i) + 1]);
  EXPECT_EQ(ledger.local_sums().bytes, static_cast<double>(bytes));
  EXPECT_THROW(ledger.score(14, losses(2)), Error);  // target 14 again
  EXPECT_THROW(ledger.score(static_cast<int64_t>(s.size()) - 2, losses(2)), Error);  // past the end
}

TEST(ScoringLedger, TrainingNeedsScoredAndReleasedTargets) {
  const std::vector<uint16_t> s = audit_stream();
  const ByteTables t = made_up_tables(kEvalVocab);
  ScoringLedger ledger(s, t, ScoringLedger::Policy::ScoreFirst);
  ledger.score(0, losses(16));
  EXPECT_THROW(ledger.require_trainable({0, 16}), Error);  // scored but not released
  EXPECT_THROW(ledger.release_local({8, 16}), Error);      // 16..23 not scored
  ledger.release_local({0, 16});
  ledger.require_trainable({0, 16});
  EXPECT_THROW(ledger.require_trainable({0, 17}), Error);
  // A scoring-only ledger (reference rescoring) allows rescoring but no training at all.
  ScoringLedger ref(s, t, ScoringLedger::Policy::ReferenceRescoring);
  ref.score(0, losses(4));
  ref.score(0, losses(4));
  EXPECT_EQ(ref.local_sums().tokens, 8.0);
  EXPECT_THROW(ref.require_trainable({0, 1}), Error);
  // The non-record pre-evaluation ledger lets training through and says it is not legal.
  ScoringLedger pre(s, t, ScoringLedger::Policy::PreEvalNotLegal);
  pre.require_trainable({0, 100});
  EXPECT_FALSE(pre.legal());
  EXPECT_TRUE(ledger.legal());
}

// release() counts over all ranks: a range is released only when every target was scored once,
// by whichever rank.
TEST(ScoringLedger, ReleaseIsACollectiveCount) {
  const std::vector<uint16_t> s = audit_stream();
  const ByteTables t = made_up_tables(kEvalVocab);
  std::atomic<int> refused{0};
  run_thread_group(2, [&](Communicator& comm) {
    ScoringLedger ledger(s, t, ScoringLedger::Policy::ScoreFirst);
    ledger.score(comm.rank() * 8, losses(8));  // rank 0: [0, 8), rank 1: [8, 16)
    const TargetRange all{0, 16};
    ledger.release(comm, std::span<const TargetRange>(&all, 1));
    ledger.require_trainable(all);  // released on both ranks, though each scored half
    const TargetRange more{0, 24};  // [16, 24) scored by nobody
    try {
      ledger.release(comm, std::span<const TargetRange>(&more, 1));
    } catch (const Error&) {
      ++refused;
    }
    // Targets scored on two ranks while others are missing: the counts match (10), the index sums do not.
    ScoringLedger twice(s, t, ScoringLedger::Policy::ScoreFirst);
    if (comm.rank() == 0) twice.score(0, losses(6));  // [0, 6)
    else twice.score(4, losses(4));                   // [4, 8); [8, 10) scored by nobody
    const TargetRange r{0, 10};
    try {
      twice.release(comm, std::span<const TargetRange>(&r, 1));
    } catch (const Error&) {
      ++refused;
    }
  });
  EXPECT_EQ(refused.load(), 4);
}
