// Legality of every TTT mode (ENGINEERING §7, SPEC §1): an instrumented run of each mode on 1 and 2
// ranks records which model state scored every validation target and which targets every state was
// trained on (tests/eval/audit_engine.h), and asserts: every target is scored exactly once; training
// reads only targets scored before; no target is scored by a state trained on it or on a target
// scored after it (for the chunked modes, also on no later stream position); the scored bytes are the
// flat stream's (SPEC §2.6). The s562 pre-evaluation form must fail the same check.
#include <gtest/gtest.h>

#include <memory>
#include <mutex>

#include "audit_engine.h"
#include "eval/sliding.h"
#include "eval_fixture.h"

using namespace pgolf;
using namespace pgolf::test;

namespace {

struct AuditedRun {
  Audit::Report report;
  std::vector<EvalOutcome> outcomes;  // per rank
  int64_t unmatched_scores = 0;
  int64_t collected = 0;  // pipelined calls (submitted, collected later)
};

AuditedRun audited_run(const std::string& mode, int ranks, const Config& c) {
  const std::vector<uint16_t> stream = audit_stream();
  const ByteTables tables = made_up_tables(kEvalVocab);
  Audit audit(stream, kEvalVocab);
  AuditedRun run;
  run.outcomes.resize(static_cast<size_t>(ranks));
  std::mutex mu;
  on_ranks(ranks, c, eval_test_params(c), [&](CpuEngine& cpu, Communicator& comm) {
    AuditEngine engine(cpu, audit, comm.rank());
    const EvalInputs in{stream, &tables, kEvalBos, kEvalSeqLen};
    run.outcomes[static_cast<size_t>(comm.rank())] = run_eval_mode(mode, engine, comm, c, in, &engine);
    std::lock_guard lock(mu);
    run.unmatched_scores += engine.unmatched_scores;
    run.collected += engine.collected;
  });
  run.report = audit.check();
  return run;
}

class Legality : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(Legality, EveryTargetScoredOnceByAStateNotTrainedOnIt) {
  const auto& [mode, ranks] = GetParam();
  const AuditedRun run = audited_run(mode, ranks, eval_test_config());
  const Audit::Report& r = run.report;
  const bool chunked = mode == "ttt-sgd" || mode == "ttt-adamw";
  EXPECT_EQ(run.unmatched_scores, 0);
  EXPECT_EQ(r.scored_not_once, 0);
  EXPECT_EQ(r.trained_before_scored, 0);
  EXPECT_EQ(r.scored_by_trained_model, 0);
  EXPECT_EQ(r.trained_on_later, 0);
  if (chunked) {
    EXPECT_EQ(r.trained_on_later_position, 0);
  }
  EXPECT_TRUE(r.legal(chunked));
  // The scores came through the pipelined calls (scored after the next call was submitted).
  EXPECT_GT(run.collected, ranks);
  // The run did train: several base versions (chunked, phased) or adapter states (LoRA).
  EXPECT_GT(r.training_reads, 0);
  if (mode != "ttt-lora") {
    EXPECT_GT(r.base_versions, 3);
  }
  if (mode == "ttt-lora" || mode == "ttt-phased") {
    EXPECT_GT(r.lora_states, 3);
  }
  // Counted sums: every target once, the flat stream's bytes; identical on every rank.
  const std::vector<uint16_t> stream = audit_stream();
  const TargetBytes flat = count_stream_bytes(made_up_tables(kEvalVocab), std::span<const uint16_t>(stream));
  for (const EvalOutcome& o : run.outcomes) {
    EXPECT_TRUE(o.legal);
    EXPECT_TRUE(o.complete);
    EXPECT_EQ(o.tokens(), flat.targets);
    EXPECT_EQ(o.bytes(), flat.bytes);
    EXPECT_EQ(o.unscored(), 0);
    EXPECT_EQ(o.sums.loss_sum, run.outcomes[0].sums.loss_sum);
  }
}

INSTANTIATE_TEST_SUITE_P(AllTttModes, Legality,
                         ::testing::Combine(::testing::Values("ttt-sgd", "ttt-adamw", "ttt-lora", "ttt-phased"),
                                            ::testing::Values(1, 2)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_" + std::to_string(std::get<1>(info.param)) + "ranks";
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// The pre-evaluation form trains on every validation sequence before scoring: the same audit must
// find it illegal, and its outcome must say so.
TEST(Legality, PreEvaluationTttFailsTheCheck) {
  for (int ranks : {1, 2}) {
    Config c = eval_test_config();
    c.set("ttt_pre_eval", true);
    c.set("ttt_batch_seqs", int64_t{4});  // 37 sequences: 18 / 19 per rank, 5 steps each
    const AuditedRun run = audited_run("ttt-adamw", ranks, c);
    const Audit::Report& r = run.report;
    EXPECT_EQ(run.unmatched_scores, 0);
    EXPECT_FALSE(r.legal(false));
    EXPECT_GT(r.trained_before_scored, 0);
    EXPECT_GT(r.scored_by_trained_model, 0);
    for (const EvalOutcome& o : run.outcomes) {
      EXPECT_FALSE(o.legal);
      EXPECT_EQ(o.mode, "ttt-adamw-pre-eval");
      EXPECT_NE(o.note.find(kNotLegalLabel), std::string::npos) << o.note;
    }
  }
}

// The audit itself can fail: a chunked run whose ledger were bypassed (training on a chunk before
// scoring it) is what the pre-evaluation run shows; here a model trained on the first half is scored
// on the whole stream, which the check must flag as trained-on-later.
TEST(Legality, AuditFlagsAStateTrainedOnLaterTargets) {
  const std::vector<uint16_t> stream = audit_stream();
  const ByteTables tables = made_up_tables(kEvalVocab);
  Config c = eval_test_config();
  Audit audit(stream, kEvalVocab);
  on_ranks(1, c, eval_test_params(c), [&](CpuEngine& cpu, Communicator& comm) {
    AuditEngine engine(cpu, audit, 0);
    ScoringLedger ledger(stream, tables, ScoringLedger::Policy::ScoreFirst, &engine);
    // Score the first 32 targets, train on targets [32, 64) (not scored yet), then score the rest.
    const WindowPlan plan(static_cast<int64_t>(stream.size()) - 1, kEvalSeqLen, 4, WindowRule::Clean);
    score_windows(engine, ledger, stream, plan, {0, 5}, 8);
    engine.ttt_begin({});
    Batch b;
    b.rows = 2;
    b.seq_len = 16;
    b.inputs.assign(stream.begin() + 32, stream.begin() + 64);
    b.targets.assign(stream.begin() + 33, stream.begin() + 65);
    engine.ttt_step(b, 1.0);
    engine.ttt_end();
    score_windows(engine, ledger, stream, plan, {5, plan.size()}, 8);
  });
  const Audit::Report r = audit.check();
  EXPECT_EQ(r.scored_not_once, 0);
  EXPECT_EQ(r.trained_before_scored, 32);
  EXPECT_EQ(r.scored_by_trained_model, 32);
  EXPECT_GT(r.trained_on_later, 0);
  EXPECT_FALSE(r.legal(true));
}

}  // namespace
