// Counts of the sliding-window rules, the TTT chunk plan and the document plan on the FineWeb
// validation prefix (SPEC §6.2, §6.3, §6.5): pure counting, no model. The expected numbers are derived
// here from the SPEC's rules for this stream's N, the way the SPEC derives them for N = 62,021,632.
#include <gtest/gtest.h>

#include <vector>

#include "data/bpb.h"
#include "data/tokenizer.h"
#include "eval/documents.h"
#include "eval/ledger.h"
#include "eval/windows.h"
#include "test_util.h"

using namespace pgolf;

namespace {

struct Prefix {
  std::vector<uint16_t> tokens;
  ByteTables tables;
  int bos = 1;
};

Prefix load_prefix(int64_t seq_len) {
  Tokenizer tok(test::sp1024_model());
  return {load_validation_tokens({test::val_prefix_shard()}, seq_len, 1024), tok.byte_tables(1024), tok.bos_id()};
}

// Scores every window of the plan with zero losses through a ledger: the targets and bytes an
// evaluation with this plan counts.
BpbAccumulator count_plan(const Prefix& p, const WindowPlan& plan, ScoringLedger::Policy policy) {
  ScoringLedger ledger(p.tokens, p.tables, policy);
  std::vector<float> zeros(static_cast<size_t>(plan.window()), 0.0f);
  for (int64_t k = 0; k < plan.size(); ++k) {
    const Window w = plan.at(k);
    ledger.score(w.first_scored(), std::span<const float>(zeros).first(static_cast<size_t>(w.scored())));
  }
  return ledger.local_sums();
}

int64_t bytes_of_targets(const Prefix& p, int64_t first, int64_t count) {
  return count_stream_bytes(p.tables, std::span<const uint16_t>(p.tokens).subspan(static_cast<size_t>(first),
                                                                                  static_cast<size_t>(count + 1)))
      .bytes;
}

}  // namespace

// The SPEC's own numbers for the full sp1024 validation set (N = 62,021,632, T = 2048, stride 64).
TEST(SlidingCounts, FullValidationSetAsTheSpecDerivesIt) {
  const int64_t N = 62'021'632;
  const WindowPlan ref(N, 2048, 64, WindowRule::Reference);
  EXPECT_EQ(ref.size(), 969'088);
  const WindowPlan::Totals t = ref.totals();
  EXPECT_EQ(t.distinct_targets, N);
  EXPECT_EQ(t.scored_positions, N + 1'984);
  const WindowPlan clean(N, 2048, 64, WindowRule::Clean);
  EXPECT_EQ(clean.totals().scored_positions, N);
  EXPECT_EQ(clean.totals().distinct_targets, N);
  const ChunkPlan chunks(clean, 32'768);
  EXPECT_EQ(chunks.size(), 1'893);
  EXPECT_EQ(chunks.training_sequences(0, 2048), 16);
}

TEST(SlidingCounts, ReferenceRuleOnThePrefixDoubleCountsTheTail) {
  const Prefix p = load_prefix(2048);
  const int64_t N = static_cast<int64_t>(p.tokens.size()) - 1;
  ASSERT_EQ(N, 1'038'336);  // ENGINEERING §3: truncated to a multiple of 2048
  // N is a multiple of 64: windows at ws = 0, 64, ..., N - 64, i.e. N / 64. The windows starting at
  // N - 64·k, k = 1..31, are truncated (len 64·k < 2048) and each scores the last 64 targets again.
  const WindowPlan plan(N, 2048, 64, WindowRule::Reference);
  EXPECT_EQ(plan.size(), N / 64);
  EXPECT_EQ(plan.size(), 16'224);
  const int64_t extra = (2048 / 64 - 1) * 64;
  EXPECT_EQ(extra, 1'984);
  const BpbAccumulator sums = count_plan(p, plan, ScoringLedger::Policy::ReferenceRescoring);
  EXPECT_EQ(sums.tokens, static_cast<double>(N + extra));
  EXPECT_EQ(sums.bytes, static_cast<double>(2'500'116 + 31 * bytes_of_targets(p, N - 64, 64)));
  // A ledger that enforces "each target once" refuses this plan.
  EXPECT_THROW(count_plan(p, plan, ScoringLedger::Policy::ScoreFirst), Error);
}

TEST(SlidingCounts, CleanRuleScoresEveryTargetOnce) {
  const Prefix p = load_prefix(2048);
  const int64_t N = static_cast<int64_t>(p.tokens.size()) - 1;
  // Windows ws = 64·k while ws + 2048 - 64 < N: k < (N - 1984) / 64.
  const WindowPlan plan(N, 2048, 64, WindowRule::Clean);
  EXPECT_EQ(plan.size(), (N - 1984) / 64);
  EXPECT_EQ(plan.size(), 16'193);
  // The ScoreFirst ledger throws on a second score, so reaching the end means "at most once".
  const BpbAccumulator sums = count_plan(p, plan, ScoringLedger::Policy::ScoreFirst);
  EXPECT_EQ(sums.tokens, static_cast<double>(N));
  EXPECT_EQ(sums.bytes, 2'500'116.0);  // the flat stream's bytes (ENGINEERING §3)
  // Every window but the first has >= 1984 tokens of context and scores 64 targets.
  for (int64_t k = 1; k < plan.size(); ++k) {
    const Window w = plan.at(k);
    ASSERT_EQ(w.score_begin, 1984);
    ASSERT_EQ(w.scored(), 64);
  }
}

TEST(SlidingCounts, FullWindowsRuleAsS600) {
  const Prefix p = load_prefix(1024);
  const int64_t N = static_cast<int64_t>(p.tokens.size()) - 1;
  ASSERT_EQ(N, 1'039'360);
  // ws in [0, N - 1024) step 512, every window full: ⌈(N - 1024)/512⌉ windows; scored: the first
  // window's 1024 targets, then 512 per window; the targets after the last window stay unscored.
  const WindowPlan plan(N, 1024, 512, WindowRule::FullWindows);
  const int64_t windows = (N - 1024 + 511) / 512;
  EXPECT_EQ(plan.size(), windows);
  EXPECT_EQ(plan.size(), 2'028);
  const int64_t scored = 1024 + (windows - 1) * 512;
  EXPECT_EQ(scored, 1'038'848);
  for (int64_t k = 0; k < plan.size(); ++k) ASSERT_EQ(plan.at(k).len, 1024);
  const BpbAccumulator sums = count_plan(p, plan, ScoringLedger::Policy::ScoreFirst);
  EXPECT_EQ(sums.tokens, static_cast<double>(scored));
  EXPECT_EQ(sums.bytes, static_cast<double>(2'502'627 - bytes_of_targets(p, scored, N - scored)));
}

TEST(SlidingCounts, TttChunksOnThePrefix) {
  const Prefix p = load_prefix(2048);
  const int64_t N = static_cast<int64_t>(p.tokens.size()) - 1;
  const WindowPlan windows(N, 2048, 64, WindowRule::Clean);
  const ChunkPlan chunks(windows, 32'768);
  EXPECT_EQ(chunks.size(), (N + 32'767) / 32'768);
  EXPECT_EQ(chunks.size(), 32);
  EXPECT_EQ(chunks.training_sequences(30, 2048), 16);
  EXPECT_EQ(chunks.training_sequences(31, 2048), (N - 31 * 32'768) / 2048);
  // Chunks partition the windows in order; window k belongs to chunk min(⌊first_scored/C⌋, n − 1).
  int64_t next = 0;
  for (int64_t c = 0; c < chunks.size(); ++c) {
    const IndexRange w = chunks.windows(c);
    ASSERT_EQ(w.begin, next);
    for (int64_t k = w.begin; k < w.end; ++k)
      ASSERT_EQ(std::min(windows.at(k).first_scored() / 32'768, chunks.size() - 1), c) << k;
    next = w.end;
  }
  EXPECT_EQ(next, windows.size());
}

TEST(DocumentCounts, PrefixDocumentsCoverTheStreamOnce) {
  const Prefix p = load_prefix(0);  // untruncated (LORA17 reads the whole stream)
  const std::vector<Document> docs = find_documents(p.tokens, p.bos);
  EXPECT_EQ(docs.size(), 902u);  // 901 whole documents and the start of the 902nd
  int64_t next = 0;
  for (const Document& d : docs) {
    ASSERT_EQ(d.first_target(), next);
    ASSERT_EQ(p.tokens[static_cast<size_t>(d.start)], p.bos);
    next += d.pred_len();
  }
  EXPECT_EQ(next, 1'040'297);
  // Their (prev, target) pairs are the flat stream's: same bytes (ENGINEERING §3).
  int64_t bytes = 0;
  for (const Document& d : docs) bytes += bytes_of_targets(p, d.first_target(), d.pred_len());
  EXPECT_EQ(bytes, 2'504'867);
}

TEST(DocumentCounts, QueueIsLongestFirstAndPhasesCutIt) {
  const Prefix p = load_prefix(0);
  const std::vector<Document> docs = find_documents(p.tokens, p.bos);
  const auto queue = plan_doc_batches(docs, 64, BatchCut::Shortest);
  ASSERT_EQ(queue.size(), (docs.size() + 63) / 64);  // 15 batches, the first (longest) one partial
  EXPECT_EQ(queue.front().size(), docs.size() % 64);
  int64_t prev_max = INT64_MAX, total = 0;
  for (const auto& batch : queue) {
    int64_t mx = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      mx = std::max(mx, docs[static_cast<size_t>(batch[i])].len);
      if (i > 0) {
        ASSERT_LE(docs[static_cast<size_t>(batch[i - 1])].len, docs[static_cast<size_t>(batch[i])].len);
      }
    }
    ASSERT_LE(mx, prev_max);
    prev_max = mx;
    total += static_cast<int64_t>(batch.size());
  }
  EXPECT_EQ(total, static_cast<int64_t>(docs.size()));
  // #1626's boundaries for 2000 documents in 3 phases; here the queue holds 902 documents.
  const auto phases = plan_phases(600, 3, queue);
  ASSERT_EQ(phases.size(), 3u);
  EXPECT_EQ(phases[0].docs, 200);
  EXPECT_EQ(phases[1].docs, 400);
  EXPECT_EQ(phases[2].docs, 600);
  for (const PhaseBoundary& ph : phases) {
    int64_t before = 0, through = 0;
    for (int64_t b = 0; b < ph.batches; ++b) through += static_cast<int64_t>(queue[static_cast<size_t>(b)].size());
    before = through - static_cast<int64_t>(queue[static_cast<size_t>(ph.batches - 1)].size());
    EXPECT_LT(before, ph.docs);
    EXPECT_GE(through, ph.docs);
  }
}

// Cut from the longest document down, the queue's first batch is full and its last holds the
// remainder, the shortest documents; every document is in one batch, and the batches still go out
// longest first. On this prefix that is 811 engine calls instead of 1,031 at chunks of 48.
TEST(DocumentCounts, LongestCutFillsTheLongestBatch) {
  const Prefix p = load_prefix(0);
  const std::vector<Document> docs = find_documents(p.tokens, p.bos);
  const auto shortest = plan_doc_batches(docs, 64, BatchCut::Shortest);
  const auto longest = plan_doc_batches(docs, 64, BatchCut::Longest);
  ASSERT_EQ(longest.size(), shortest.size());
  EXPECT_EQ(longest.front().size(), 64u);
  EXPECT_EQ(longest.back().size(), docs.size() % 64);
  std::vector<int> seen(docs.size(), 0);
  int64_t prev_max = INT64_MAX;
  for (const auto& batch : longest) {
    int64_t mx = 0;
    for (int64_t id : batch) {
      ++seen[static_cast<size_t>(id)];
      mx = std::max(mx, docs[static_cast<size_t>(id)].len);
    }
    ASSERT_LE(mx, prev_max);
    prev_max = mx;
  }
  for (int s : seen) ASSERT_EQ(s, 1);
  // Every document of a later batch is no longer than any of an earlier one.
  for (size_t b = 1; b < longest.size(); ++b)
    EXPECT_LE(docs[static_cast<size_t>(longest[b].back())].len, docs[static_cast<size_t>(longest[b - 1].front())].len);
  const auto calls = [&](const std::vector<std::vector<int64_t>>& queue) {
    int64_t total = 0;
    for (const auto& batch : queue) {
      int64_t most = 0;
      for (int64_t id : batch) most = std::max(most, num_doc_chunks(docs[static_cast<size_t>(id)].pred_len(), 48));
      total += most;
    }
    return total;
  };
  EXPECT_EQ(calls(shortest), 1031);
  EXPECT_EQ(calls(longest), 811);
  EXPECT_THROW(parse_batch_cut("middle"), std::exception);
}

TEST(DocumentCounts, ChunkWindowsOfTheReference) {
  // A document of 600 targets, chunks of 256, context 1024: [0,256) [256,512) [512,600), all from 0.
  EXPECT_EQ(num_doc_chunks(600, 256), 3);
  const ChunkWindow last = doc_chunk_window(2, 600, 256, 1024);
  EXPECT_EQ(last.win_start, 0);
  EXPECT_EQ(last.win_len, 600);
  EXPECT_EQ(last.chunk_offset, 512);
  EXPECT_EQ(last.chunk_len, 88);
  // Context 300: chunk 2 of a 600-target document sees [300, 600) and scores its last 88 positions.
  const ChunkWindow w = doc_chunk_window(2, 600, 256, 300);
  EXPECT_EQ(w.win_start, 300);
  EXPECT_EQ(w.win_len, 300);
  EXPECT_EQ(w.chunk_offset, 212);
  EXPECT_EQ(w.chunk_len, 88);
}
