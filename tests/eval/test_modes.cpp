// Behaviour of the evaluation modes on the tiny model: each mode against an independent computation
// through Engine::token_losses, the TTT schedules, rank invariance, and that test-time training
// lowers the loss where there is something to learn.
#include <gtest/gtest.h>

#include <cmath>

#include "audit_engine.h"
#include "eval/documents.h"
#include "eval/windows.h"
#include "eval_fixture.h"

using namespace pgolf;
using namespace pgolf::test;

namespace {

const std::vector<uint16_t>& stream() {
  static const std::vector<uint16_t> s = audit_stream();
  return s;
}
const ByteTables& tables() {
  static const ByteTables t = made_up_tables(kEvalVocab);
  return t;
}

// Runs `mode` on the audit stream on `ranks` ranks; returns rank 0's outcome (every rank gets the
// same sums) and the LR factors of rank 0's TTT steps.
struct ModeRun {
  EvalOutcome outcome;
  std::vector<double> lr_scales;
  int64_t lora_tokens = 0;
};
ModeRun run_mode(const std::string& mode, const Config& c, int ranks = 1) {
  ModeRun run;
  Audit audit(stream(), kEvalVocab);
  on_ranks(ranks, c, eval_test_params(c), [&](CpuEngine& cpu, Communicator& comm) {
    AuditEngine engine(cpu, audit, comm.rank());
    EvalOutcome o = run_eval_mode(mode, engine, comm, c, {stream(), &tables(), kEvalBos, kEvalSeqLen});
    if (comm.rank() == 0) {
      run.outcome = o;
      run.lr_scales = engine.lr_scales;
      run.lora_tokens = engine.lora_tokens;
    }
  });
  return run;
}

// One rank, any stream.
EvalOutcome run_on(const std::string& mode, const Config& c, const std::vector<uint16_t>& tokens) {
  EvalOutcome out;
  on_ranks(1, c, eval_test_params(c), [&](CpuEngine& e, Communicator& comm) {
    out = run_eval_mode(mode, e, comm, c, {tokens, &tables(), kEvalBos, kEvalSeqLen});
  });
  return out;
}

// Σ over targets of the NLL of a one-row forward of tokens[start, start + len), positions [from, len).
double row_loss(CpuEngine& e, std::span<const uint16_t> s, int64_t start, int64_t len, int64_t from) {
  Batch b;
  b.rows = 1;
  b.seq_len = len;
  b.inputs.assign(s.begin() + start, s.begin() + start + len);
  b.targets.assign(s.begin() + start + 1, s.begin() + start + len + 1);
  std::vector<float> nll;
  e.token_losses(b, nll);
  double sum = 0.0;
  for (int64_t j = from; j < len; ++j) sum += nll[static_cast<size_t>(j)];
  return sum;
}

void expect_rel_near(double a, double b, double rel, const char* what) {
  EXPECT_NEAR(a, b, rel * std::fabs(b)) << what;
}

}  // namespace

// Stride = T under the clean rule is the flat evaluation: consecutive T-token rows, all scored.
TEST(EvalModes, SlidingWithStrideTIsTheFlatSum) {
  Config c = eval_test_config();
  c.set("eval_stride", kEvalSeqLen);
  const ModeRun r = run_mode("sliding", c);
  const int64_t N = static_cast<int64_t>(stream().size()) - 1;
  double expected = 0.0;
  on_ranks(1, c, eval_test_params(c), [&](CpuEngine& e, Communicator&) {
    for (int64_t s = 0; s < N; s += kEvalSeqLen) expected += row_loss(e, stream(), s, std::min(kEvalSeqLen, N - s), 0);
  });
  EXPECT_EQ(r.outcome.tokens(), N);
  // fp32 forwards of the same rows in batches of different shapes: equal to ~1e-7 relative.
  expect_rel_near(r.outcome.sums.loss_sum, expected, 1e-6, "loss sum");
}

// Every window's scored positions, recomputed one window at a time.
TEST(EvalModes, SlidingScoresEachWindowsTail) {
  for (const std::string rule : {"reference", "clean"}) {
    Config c = eval_test_config();
    c.set("sliding_rule", rule);
    const ModeRun r = run_mode("sliding", c, 2);
    const int64_t N = static_cast<int64_t>(stream().size()) - 1;
    const WindowPlan plan(N, kEvalSeqLen, 4, parse_window_rule(rule));
    double expected = 0.0;
    on_ranks(1, c, eval_test_params(c), [&](CpuEngine& e, Communicator&) {
      for (int64_t k = 0; k < plan.size(); ++k) {
        const Window w = plan.at(k);
        expected += row_loss(e, stream(), w.start, w.len, w.score_begin);
      }
    });
    expect_rel_near(r.outcome.sums.loss_sum, expected, 1e-6, rule.c_str());
    // N = 599 is not a multiple of the stride: the reference tail windows rescore 3 + 4·2 targets.
    EXPECT_EQ(r.outcome.rescored, rule == "reference" ? plan.totals().scored_positions - N : 0) << rule;
    EXPECT_EQ(r.outcome.unscored(), 0) << rule;
  }
}

// With a zero LR, score-first TTT is the clean sliding evaluation; the LR factors follow the cosine
// over chunks (SGD, S691) or over all steps (s562's AdamW recipe).
TEST(EvalModes, ChunkedTttSchedulesAndZeroLrIsSliding) {
  Config c = eval_test_config();
  c.set("ttt_lr", 0.0);
  const ModeRun sliding = run_mode("sliding", c);
  const ModeRun sgd = run_mode("ttt-sgd", c);
  expect_rel_near(sgd.outcome.sums.loss_sum, sliding.outcome.sums.loss_sum, 1e-6, "sgd lr 0 vs sliding");
  // 599 targets in chunks of 64: 10 chunks, 9 trained, each 4 sequences = 2 batches x 2 epochs.
  const int64_t chunks = 10, steps_per_chunk = 4;
  ASSERT_EQ(sgd.lr_scales.size(), static_cast<size_t>((chunks - 1) * steps_per_chunk));
  for (size_t k = 0; k < sgd.lr_scales.size(); ++k) {
    const double ci = static_cast<double>(k / steps_per_chunk);
    EXPECT_DOUBLE_EQ(sgd.lr_scales[k], 0.5 * (1 + std::cos(M_PI * ci / (chunks - 1)))) << k;
  }
  c.set("ttt_cosine", std::string("steps"));
  const ModeRun adamw = run_mode("ttt-adamw", c);
  expect_rel_near(adamw.outcome.sums.loss_sum, sliding.outcome.sums.loss_sum, 1e-6, "adamw lr 0 vs sliding");
  const size_t total = adamw.lr_scales.size();
  ASSERT_EQ(total, sgd.lr_scales.size());
  for (size_t g = 0; g < total; ++g)
    EXPECT_DOUBLE_EQ(adamw.lr_scales[g], 0.5 * (1 + std::cos(M_PI * static_cast<double>(g) / static_cast<double>(total))));
}

// With a zero LR, LoRA TTT scores each chunk of each document from its own context window.
TEST(EvalModes, LoraZeroLrIsPerDocumentChunkScoring) {
  Config c = eval_test_config();
  c.set("ttt_lora_lr", 0.0);
  const ModeRun r = run_mode("ttt-lora", c);
  double expected = 0.0;
  on_ranks(1, c, eval_test_params(c), [&](CpuEngine& e, Communicator&) {
    for (const Document& d : find_documents(stream(), kEvalBos))
      for (int64_t ci = 0; ci < num_doc_chunks(d.pred_len(), 8); ++ci) {
        const ChunkWindow w = doc_chunk_window(ci, d.pred_len(), 8, kEvalSeqLen);
        expected += row_loss(e, stream(), d.start + w.win_start, w.win_len, w.chunk_offset);
      }
  });
  EXPECT_EQ(r.outcome.tokens(), static_cast<int64_t>(stream().size()) - 1);
  expect_rel_near(r.outcome.sums.loss_sum, expected, 1e-6, "lora lr 0");
}

// Two ranks compute what one rank computes: the same windows and documents, and — when one rank's
// batch holds a whole chunk (4 sequences) — the same steps, gradients averaged over the ranks' equal
// halves (the mean over the batch).
TEST(EvalModes, TwoRanksEqualOneRank) {
  Config c = eval_test_config();
  c.set("ttt_batch_seqs", int64_t{4});
  for (const std::string mode : {"sliding", "ttt-sgd", "ttt-adamw", "ttt-lora", "ttt-phased"}) {
    const ModeRun one = run_mode(mode, c, 1), two = run_mode(mode, c, 2);
    EXPECT_EQ(one.outcome.tokens(), two.outcome.tokens()) << mode;
    EXPECT_EQ(one.outcome.bytes(), two.outcome.bytes()) << mode;
    // fp32 training steps whose gradients differ in summation order: ~1e-6 after a few dozen steps.
    expect_rel_near(two.outcome.sums.loss_sum, one.outcome.sums.loss_sum, 2e-5, mode.c_str());
  }
}

// Repeated content: once a chunk (or a document's first chunks) is scored and trained on, the rest
// is predicted better — every TTT mode beats the same model's sliding score, and an LR of zero does not.
TEST(EvalModes, TestTimeTrainingLearnsRepeatedContent) {
  // 10 documents with the same 47 tokens; inside each, an 8-token motif repeats.
  std::vector<uint16_t> s;
  for (int d = 0; d < 10; ++d) {
    s.push_back(kEvalBos);
    for (int i = 0; i < 47; ++i) s.push_back(static_cast<uint16_t>(100 + (i % 8) * 7));
  }
  Config c = eval_test_config();
  c.set("ttt_lr", 0.02);
  c.set("ttt_lora_lr", 0.05);
  c.set("phased_ttt_lr", 0.05);
  const double sliding = run_on("sliding", c, s).val_bpb();
  for (const std::string mode : {"ttt-sgd", "ttt-adamw", "ttt-lora", "ttt-phased"}) {
    const double bpb = run_on(mode, c, s).val_bpb();
    EXPECT_LT(bpb, sliding - 0.05) << mode << ": " << bpb << " vs sliding " << sliding;
  }
}

// LoRA TTT forwards only the documents that still have chunks (rows in descending order of chunk
// counts, row b keeping adapter b): the same scores as forwarding every row of the batch to the
// longest document's end, with less work, and as legal (the audit engine checks score-first).
TEST(EvalModes, LoraActiveRowsScoreAsAllRows) {
  Config c = eval_test_config();
  c.set("ttt_lora_active_rows", false);
  const ModeRun all = run_mode("ttt-lora", c);
  c.set("ttt_lora_active_rows", true);
  const ModeRun active = run_mode("ttt-lora", c);
  ASSERT_TRUE(all.outcome.complete && active.outcome.complete);
  EXPECT_TRUE(active.outcome.legal);
  EXPECT_EQ(active.outcome.tokens(), all.outcome.tokens());
  EXPECT_EQ(active.outcome.bytes(), all.outcome.bytes());
  expect_rel_near(active.outcome.sums.loss_sum, all.outcome.sums.loss_sum, 1e-6, "active rows");
  EXPECT_LT(active.lora_tokens, all.lora_tokens * 9 / 10) << active.lora_tokens << " vs " << all.lora_tokens;  // 2,320 vs 2,784
  // The per-batch timings account for every document, call and forwarded position.
  for (const ModeRun* r : {&all, &active}) {
    const std::vector<BatchTiming>& b = r->outcome.batches;
    ASSERT_FALSE(b.empty());
    int64_t docs = 0, tokens = 0, calls = 0;
    for (size_t k = 0; k < b.size(); ++k) {
      EXPECT_EQ(b[k].index, static_cast<int64_t>(k));
      EXPECT_GT(b[k].seconds, 0.0);
      docs += b[k].docs, tokens += b[k].tokens, calls += b[k].calls;
    }
    EXPECT_EQ(docs, static_cast<int64_t>(find_documents(stream(), kEvalBos).size()));
    EXPECT_EQ(tokens, r->lora_tokens);
    // Per batch: one call per chunk index of its longest document, and ttt_grad_steps - 1 extra steps
    // at every chunk index but the last (some document trains on it).
    const std::vector<Document> found = find_documents(stream(), kEvalBos);
    int64_t expected_calls = 0;
    for (const auto& batch : plan_doc_batches(found, c.get_int("ttt_batch_size"), parse_batch_cut(c.get_string("ttt_batch_cut")))) {
      int64_t most = 0;
      for (int64_t id : batch)
        most = std::max(most, num_doc_chunks(found[static_cast<size_t>(id)].pred_len(), c.get_int("ttt_chunk_size")));
      expected_calls += most + (most - 1) * (c.get_int("ttt_grad_steps") - 1);
    }
    EXPECT_EQ(calls, expected_calls);
  }
}

// The batch cut only groups documents differently: with a learning rate of zero (B = 0 keeps every
// adapter's output 0) both cuts score the same up to fp32 rounding of batches of another width; with
// learning, as legally and close.
TEST(EvalModes, LoraBatchCutsScoreTheSameDocuments) {
  Config c = eval_test_config();
  c.set("ttt_batch_size", int64_t{4});
  for (const double lr : {0.0, 0.01}) {
    c.set("ttt_lora_lr", lr);
    c.set("ttt_batch_cut", std::string("shortest"));
    const ModeRun shortest = run_mode("ttt-lora", c);
    c.set("ttt_batch_cut", std::string("longest"));
    const ModeRun longest = run_mode("ttt-lora", c);
    ASSERT_TRUE(shortest.outcome.complete && longest.outcome.complete);
    EXPECT_TRUE(shortest.outcome.legal && longest.outcome.legal);
    EXPECT_EQ(longest.outcome.tokens(), shortest.outcome.tokens());
    EXPECT_EQ(longest.outcome.bytes(), shortest.outcome.bytes());
    EXPECT_NE(longest.outcome.batches.front().docs, shortest.outcome.batches.front().docs);
    if (lr == 0.0)
      expect_rel_near(longest.outcome.sums.loss_sum, shortest.outcome.sums.loss_sum, 1e-8, "lr 0");
    else
      expect_rel_near(longest.outcome.sums.loss_sum, shortest.outcome.sums.loss_sum, 1e-2, "lr 0.01");
  }
}

// The wall-clock cap stops handing out document batches; what is left is reported unscored.
TEST(EvalModes, LoraCapLeavesDocumentsUnscoredAndSaysSo) {
  Config c = eval_test_config();
  c.set("ttt_max_seconds", 1e-9);
  const ModeRun r = run_mode("ttt-lora", c, 2);
  EXPECT_FALSE(r.outcome.complete);
  EXPECT_EQ(r.outcome.unscored(), static_cast<int64_t>(stream().size()) - 1);
  EXPECT_NE(r.outcome.note.find("INCOMPLETE"), std::string::npos);
}
