#include <gtest/gtest.h>

#include <cmath>
#include <mutex>

#include "data/tokenizer.h"
#include "dist/communicator.h"
#include "eval/flat.h"
#include "model/engine.h"
#include "model/init.h"
#include "model/tiny_models.h"
#include "test_util.h"
#include "train/cpu_engine.h"

using namespace pgolf;

namespace {

// An engine whose loss of a target is a known function of the id, recording the batches it sees:
// the evaluation's bookkeeping (ranges, batches, sums, segments) can then be checked exactly on the
// full validation prefix without running a model over a million tokens.
class ScriptedEngine final : public Engine {
 public:
  static float loss_of(int32_t target) { return 1.0f + 0.25f * static_cast<float>(target % 7); }

  const ModelConfig& model_config() const override { return config_; }
  const ParamLayout& layout() const override { return layout_; }
  const char* backend_name() const override { return "scripted"; }
  void load_params(const ParamSet<float>&) override { unused(); }
  void store_params(ParamSet<float>&) const override { unused(); }
  TensorMap optimizer_state() const override { unused(); }
  void load_optimizer_state(const TensorMap&, const std::string&) override { unused(); }
  void init_ema() override { unused(); }
  void store_ema(ParamSet<float>&) const override { unused(); }
  void set_looping(bool) override { unused(); }
  void set_qat(bool) override { unused(); }
  StepResult train_step(std::span<const Batch>, const StepControl&) override { unused(); }
  void token_losses(const Batch& batch, std::vector<float>& nll) override {
    batch.validate(1 << 16);
    batches.push_back(batch);
    nll.resize(batch.targets.size());
    for (size_t i = 0; i < nll.size(); ++i) nll[i] = loss_of(batch.targets[i]);
  }
  void ttt_begin(const TttOptimizerConfig&) override { unused(); }
  double ttt_step(const Batch&, double) override { unused(); }
  void ttt_end() override { unused(); }
  void lora_begin(const LoraConfig&, int64_t, const LoraOptimizerConfig&) override { unused(); }
  void lora_reset(uint64_t) override { unused(); }
  void lora_score_and_train(const Batch&, std::span<const float>, std::vector<float>&) override { unused(); }
  void lora_train_step(const Batch&, std::span<const float>) override { unused(); }
  void lora_end() override { unused(); }
  void accumulate_hessians(const Batch&, TensorMap&) override { unused(); }

  std::vector<Batch> batches;

 private:
  [[noreturn]] static void unused() { fail("ScriptedEngine: only token_losses is scripted"); }
  ModelConfig config_;
  ParamLayout layout_;
};

Config val_prefix_config(int64_t seq_len) {
  Config c = Config::load("baseline");
  c.set("val_files", test::val_prefix_shard().string());
  c.set("train_seq_len", seq_len);
  return c;
}

FlatEvalResult scripted_eval(std::span<const uint16_t> tokens, const ByteTables& tables, const FlatEvalOptions& o,
                             int world, std::vector<std::vector<Batch>>* seen = nullptr) {
  std::vector<FlatEvalResult> results(static_cast<size_t>(world));
  if (seen) seen->assign(static_cast<size_t>(world), {});
  run_thread_group(world, [&](Communicator& comm) {
    ScriptedEngine e;
    results[comm.rank()] = evaluate_flat(e, comm, tokens, tables, o);
    if (seen) (*seen)[comm.rank()] = std::move(e.batches);
  });
  for (int r = 1; r < world; ++r) {
    EXPECT_EQ(results[r].val_loss, results[0].val_loss) << "rank " << r;
    EXPECT_EQ(results[r].val_bpb, results[0].val_bpb) << "rank " << r;
  }
  return results[0];
}

}  // namespace

// The check values of the validation prefix (shared/data/README.md): 1,039,360 targets and
// 2,502,627 bytes at T = 1024, however many ranks share the sequences.
TEST(FlatEval, CountsTheTargetsAndBytesOfTheValidationPrefix) {
  const Config c = val_prefix_config(1024);
  const std::vector<uint16_t> tokens = load_eval_tokens(c.get_string("val_files"), c);
  ASSERT_EQ(tokens.size(), 1039361u);
  const ByteTables tables = Tokenizer(test::sp1024_model()).byte_tables(1024);
  double expected_loss = 0.0;
  for (size_t i = 1; i < tokens.size(); ++i) expected_loss += ScriptedEngine::loss_of(tokens[i]);
  for (int world : {1, 3, 8}) {
    FlatEvalOptions o = FlatEvalOptions::from_config(c, 1, 1);
    const FlatEvalResult r = scripted_eval(tokens, tables, o, world);
    EXPECT_EQ(r.tokens, 1039360) << world;
    EXPECT_EQ(r.bytes, 2502627) << world;
    EXPECT_NEAR(r.val_loss, expected_loss / 1039360.0, 1e-12) << world;
    EXPECT_NEAR(r.val_bpb, expected_loss / (std::log(2.0) * 2502627.0), 1e-12) << world;
  }
}

// Ranks take ⌊S·r/W⌋..⌊S·(r+1)/W⌋ in batches of val_batch_tokens / (W · grad_accum) tokens; the
// s1560 quirk truncates every range to a multiple of 32 sequences.
TEST(FlatEval, SplitsSequencesOverRanksAndBatches) {
  const Config c = val_prefix_config(1024);
  const std::vector<uint16_t> tokens = load_eval_tokens(c.get_string("val_files"), c);
  const ByteTables tables = Tokenizer(test::sp1024_model()).byte_tables(1024);
  FlatEvalOptions o = FlatEvalOptions::from_config(c, 1, 1);  // 8 ranks x 1: 64 sequences per batch
  std::vector<std::vector<Batch>> seen;
  scripted_eval(tokens, tables, o, 8, &seen);
  // S = 1015 sequences: rank 0 gets [0, 126), the others 127 each.
  for (int r = 0; r < 8; ++r) {
    int64_t seqs = 0;
    for (const Batch& b : seen[r]) {
      EXPECT_LE(b.rows, 64);
      EXPECT_EQ(b.seq_len, 1024);
      seqs += b.rows;
    }
    EXPECT_EQ(seqs, r == 0 ? 126 : 127) << r;
    ASSERT_FALSE(seen[r].empty());
    const int64_t first_seq = 1015 * r / 8;
    EXPECT_EQ(seen[r][0].inputs[0], tokens[static_cast<size_t>(first_seq * 1024)]) << r;
  }
  o.rank_seq_multiple = 32;
  const FlatEvalResult t = scripted_eval(tokens, tables, o, 8, &seen);
  // Every range of 126 or 127 sequences keeps 96: 768 sequences of 1024 targets.
  EXPECT_EQ(t.tokens, 768 * 1024);
  for (int r = 0; r < 8; ++r) {
    int64_t seqs = 0;
    for (const Batch& b : seen[r]) seqs += b.rows;
    EXPECT_EQ(seqs, 96) << r;
  }
}

// Document isolation: one flat row per batch whose segments start at every BOS (and at 0) and are
// cut every T tokens; the sums are those of the dense evaluation (same targets and bytes).
TEST(FlatEval, DocumentIsolationCutsSegmentsAtBosAndEveryT) {
  const int64_t T = 256;
  Config c = val_prefix_config(T);
  c.set("val_max_tokens", int64_t{40000});
  const std::vector<uint16_t> tokens = load_eval_tokens(c.get_string("val_files"), c);
  ASSERT_EQ(tokens.size(), static_cast<size_t>(156 * T + 1));  // 40,000 targets hold 156 whole sequences
  const ByteTables tables = Tokenizer(test::sp1024_model()).byte_tables(1024);
  FlatEvalOptions o = FlatEvalOptions::from_config(c, 8, 1);
  const FlatEvalResult dense = scripted_eval(tokens, tables, o, 1);
  o.doc_isolated = true;
  std::vector<std::vector<Batch>> seen;
  const FlatEvalResult iso = scripted_eval(tokens, tables, o, 1, &seen);
  EXPECT_EQ(iso.tokens, dense.tokens);
  EXPECT_EQ(iso.bytes, dense.bytes);
  EXPECT_EQ(iso.val_loss, dense.val_loss);
  int64_t offset = 0, bos_seen = 0;
  for (const Batch& b : seen[0]) {
    ASSERT_EQ(b.rows, 1);
    EXPECT_EQ(b.cu_seqlens.size() % 64, 0u);
    // Rebuild the expected starts: every BOS, position 0, and every T after a document start.
    std::vector<int32_t> expected;
    int64_t doc_start = 0;
    for (int64_t i = 0; i < b.seq_len; ++i) {
      const bool bos = tokens[static_cast<size_t>(offset + i)] == 1;
      if (bos) doc_start = i, ++bos_seen;
      if (i == 0 || bos || (i - doc_start) % T == 0) expected.push_back(static_cast<int32_t>(i));
    }
    std::vector<int32_t> starts;
    for (size_t k = 0; k + 1 < b.cu_seqlens.size() && b.cu_seqlens[k] < b.seq_len; ++k) starts.push_back(b.cu_seqlens[k]);
    EXPECT_EQ(starts, expected);
    EXPECT_LE(b.max_seqlen, T);
    offset += b.seq_len;
  }
  EXPECT_EQ(offset, 156 * T);
  EXPECT_GT(bos_seen, 10);  // the prefix holds dozens of documents: the test exercises the cuts
}

// With the CPU model: the evaluation equals the per-sequence eval-mode losses summed in fp64, and
// several ranks agree with one.
TEST(FlatEval, MatchesPerSequenceLossesOfTheCpuEngine) {
  Config c = test::tiny_preset("s691");
  c.set("train_seq_len", int64_t{12});
  c.set("val_batch_tokens", int64_t{8 * 3 * 12});  // 3 sequences per batch on 1 rank x 8 accumulation
  auto single = make_single_process_communicator();
  ParamSet<float> params;
  {
    CpuModel<float> m(ModelConfig::from_config(c));
    test::perturbed_init(m, 4);
    params = m.params();
  }
  Rng rng(99);
  std::vector<uint16_t> tokens(12 * 10 + 1);
  for (auto& t : tokens) t = static_cast<uint16_t>(rng.below(64));
  ByteTables tables;
  for (int i = 0; i < 64; ++i) {
    tables.base_bytes.push_back(i < 4 ? 0 : 1 + i % 3);
    tables.has_leading_space.push_back(i % 2);
    tables.is_boundary.push_back(i < 4);
  }
  double loss = 0.0;
  int64_t bytes = count_stream_bytes<uint16_t>(tables, tokens).bytes;
  {
    CpuEngine e(c, *single);
    e.load_params(params);
    std::vector<float> nll;
    for (int s = 0; s < 10; ++s) {
      Batch b;
      b.rows = 1;
      b.seq_len = 12;
      b.inputs.assign(tokens.begin() + s * 12, tokens.begin() + s * 12 + 12);
      b.targets.assign(tokens.begin() + s * 12 + 1, tokens.begin() + s * 12 + 13);
      e.token_losses(b, nll);
      for (float x : nll) loss += x;
    }
  }
  for (int world : {1, 2, 4}) {
    std::vector<FlatEvalResult> r(static_cast<size_t>(world));
    run_thread_group(world, [&](Communicator& comm) {
      CpuEngine e(c, comm);
      e.load_params(params);
      r[comm.rank()] = evaluate_flat(e, comm, tokens, tables, FlatEvalOptions::from_config(c, 8 / world, 1));
    });
    EXPECT_EQ(r[0].tokens, 120);
    EXPECT_EQ(r[0].bytes, bytes);
    // Per-token losses do not depend on the batch a sequence is in beyond fp32 GEMM rounding (1e-6).
    EXPECT_NEAR(r[0].val_loss, loss / 120.0, 1e-6 * loss / 120.0) << world;
    EXPECT_NEAR(r[0].val_bpb, loss / (std::log(2.0) * static_cast<double>(bytes)), 1e-6 * r[0].val_bpb) << world;
    for (int k = 1; k < world; ++k) EXPECT_EQ(r[k].val_loss, r[0].val_loss);
  }
}

TEST(FlatEval, RejectsStreamsThatAreNotWholeSequences) {
  std::vector<uint16_t> tokens(100, 5);
  ByteTables tables = Tokenizer(test::sp1024_model()).byte_tables(1024);
  FlatEvalOptions o;
  o.seq_len = 32;
  o.batch_tokens = 64;
  ScriptedEngine e;
  auto comm = make_single_process_communicator();
  try {
    evaluate_flat(e, *comm, tokens, tables, o);
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("not whole sequences of 32"), std::string::npos) << err.what();
  }
}

// val_rank_seq_multiple larger than every rank's share leaves nothing to score: refused with the
// settings named (the trainer checks this before training), and accepted once one rank scores.
TEST(FlatEval, RefusesSettingsThatScoreNothing) {
  FlatEvalOptions o;
  o.seq_len = 32;
  o.rank_seq_multiple = 4;
  const std::vector<uint16_t> three(3 * 32 + 1, 5), four(4 * 32 + 1, 5);
  try {
    o.check_scores_something(three, 1, "validation v.bin");
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("validation v.bin: 3 sequences of 32 tokens over 1 rank(s) leave nothing "
                                           "to score with val_rank_seq_multiple 4"),
              std::string::npos)
        << err.what();
  }
  EXPECT_NO_THROW(o.check_scores_something(four, 1, "v"));
  EXPECT_THROW(o.check_scores_something(four, 2, "v"), Error) << "2 sequences per rank";
  o.rank_seq_multiple = 0;
  EXPECT_NO_THROW(o.check_scores_something(three, 2, "v"));
}
