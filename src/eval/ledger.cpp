#include "eval/ledger.h"

#include <cmath>

#include "dist/communicator.h"

namespace pgolf {

ScoringLedger::ScoringLedger(std::span<const uint16_t> tokens, const ByteTables& tables, Policy policy,
                             ScoreObserver* observer)
    : tokens_(tokens), tables_(tables), policy_(policy), observer_(observer) {
  PG_CHECK(tokens.size() >= 2, "evaluation stream of {} tokens has no target", tokens.size());
  flags_.assign(tokens.size() - 1, 0);
}

void ScoringLedger::check_range(TargetRange r, const char* what) const {
  PG_CHECK(r.first >= 0 && r.count >= 0 && r.first + r.count <= num_targets(),
           "{}: targets [{}, {}) outside the stream's {} targets", what, r.first, r.first + r.count, num_targets());
}

void ScoringLedger::score(int64_t first, std::span<const float> nll) {
  const int64_t n = static_cast<int64_t>(nll.size());
  check_range({first, n}, "score");
  double loss = 0.0;
  int64_t bytes = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = first + k;
    uint8_t& f = flags_[static_cast<size_t>(i)];
    PG_CHECK(f == 0 || policy_ != Policy::ScoreFirst,
             "target {} is scored a second time (each validation token may be scored once)", i);
    f |= kScoredHere;
    loss += static_cast<double>(nll[static_cast<size_t>(k)]);
    bytes += tables_.bytes(tokens_[static_cast<size_t>(i)], tokens_[static_cast<size_t>(i) + 1]);
  }
  PG_CHECK(std::isfinite(loss), "non-finite loss among targets [{}, {})", first, first + n);
  sums_.add(loss, static_cast<double>(n), static_cast<double>(bytes));
  if (observer_) observer_->on_score(first, nll);
}

void ScoringLedger::release(Communicator& comm, std::span<const TargetRange> ranges) {
  // Scored here: count and index sum (exact in fp64 below 2^53). Expected: every target once.
  double local[2] = {0.0, 0.0};
  double expected[2] = {0.0, 0.0};
  for (const TargetRange& r : ranges) {
    check_range(r, "release");
    for (int64_t i = r.first; i < r.first + r.count; ++i) {
      if (flags_[static_cast<size_t>(i)] & kScoredHere) {
        local[0] += 1.0;
        local[1] += static_cast<double>(i);
      }
      expected[0] += 1.0;
      expected[1] += static_cast<double>(i);
    }
  }
  comm.all_reduce_host(local, 2, ReduceOp::Sum);
  PG_CHECK(local[0] == expected[0] && local[1] == expected[1],
           "training would read targets not yet scored: {} of the {} targets in {} ranges from target {} were scored "
           "over all ranks",
           local[0], expected[0], ranges.size(), ranges.empty() ? 0 : ranges.front().first);
  for (const TargetRange& r : ranges)
    for (int64_t i = r.first; i < r.first + r.count; ++i) flags_[static_cast<size_t>(i)] |= kTrainable;
}

void ScoringLedger::release_local(TargetRange r) {
  check_range(r, "release");
  for (int64_t i = r.first; i < r.first + r.count; ++i) {
    uint8_t& f = flags_[static_cast<size_t>(i)];
    PG_CHECK(f & kScoredHere, "training would read target {} before it is scored (on this rank)", i);
    f |= kTrainable;
  }
}

void ScoringLedger::require_trainable(TargetRange r) const {
  check_range(r, "train");
  if (policy_ == Policy::PreEvalNotLegal) return;
  PG_CHECK(policy_ == Policy::ScoreFirst, "a ledger for scoring only (reference rescoring) allows no training");
  for (int64_t i = r.first; i < r.first + r.count; ++i)
    PG_CHECK(flags_[static_cast<size_t>(i)] & kTrainable,
             "training would read target {} that was not scored (and released) before", i);
}

BpbAccumulator ScoringLedger::global_sums(Communicator& comm) const {
  double v[3] = {sums_.loss_sum, sums_.tokens, sums_.bytes};
  comm.all_reduce_host(v, 3, ReduceOp::Sum);
  BpbAccumulator out;
  out.add(v[0], v[1], v[2]);
  return out;
}

}  // namespace pgolf
