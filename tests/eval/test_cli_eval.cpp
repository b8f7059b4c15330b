// pgolf eval end to end: a tiny checkpoint (and its packed artifact) scored on the first documents
// of the FineWeb validation prefix with the sp1024 tokenizer.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/safetensors.h"
#include "data/bpb.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "model/tiny_models.h"
#include "test_util.h"

using namespace pgolf;
using ::testing::HasSubstr;

namespace {

class EvalCli : public ::testing::Test {
 protected:
  void SetUp() override {
    // The first 4,097 tokens of the validation prefix (it starts with a BOS) as the validation shard.
    const Shard prefix(test::val_prefix_shard());
    write_shard(dir_ / "val_000000.bin", prefix.tokens().first(4097));
    write_text_file_atomic(dir_ / "tiny.toml", R"(inherit = "baseline"
vocab_size = 1024
num_layers = 2
model_dim = 32
num_heads = 4
num_kv_heads = 2
train_seq_len = 128
val_batch_tokens = 1024
eval_stride = 32
eval_batch_seqs = 16
ttt_chunk_tokens = 512
ttt_epochs = 1
ttt_batch_seqs = 4
ttt_lora_rank = 2
ttt_chunk_size = 32
ttt_eval_seq_len = 128
ttt_batch_size = 4
phased_ttt_prefix_docs = 2
)");
    const Config c = Config::load((dir_ / "tiny.toml").string());
    CpuModel<float> m(ModelConfig::from_config(c));
    test::perturbed_init(m, 5);
    save_safetensors(dir_ / "ck.safetensors", m.params().to_tensors());
    // Expected counts: the stream truncated to a multiple of T = 128 (SPEC §2.5), its bytes.
    Tokenizer tok(test::sp1024_model());
    tokens_ = load_validation_tokens({dir_ / "val_000000.bin"}, 128, 1024);
    flat_ = count_stream_bytes(tok.byte_tables(1024), std::span<const uint16_t>(tokens_));
  }
  std::string common() const {
    return " --val " + (dir_ / "val_*.bin").string() + " --tokenizer " + test::sp1024_model().string();
  }
  std::string with_checkpoint() const {
    return "eval --checkpoint " + (dir_ / "ck.safetensors").string() + " --preset " + (dir_ / "tiny.toml").string() +
           common();
  }
  nlohmann::json run_json(const std::string& args) const {
    const auto r = test::run_pgolf(args + " --json");
    EXPECT_EQ(r.status, 0) << r.output;
    return nlohmann::json::parse(r.output);
  }

  test::TempDir dir_;
  std::vector<uint16_t> tokens_;
  TargetBytes flat_;
};

TEST_F(EvalCli, EveryModeScoresTheWholeStreamFromTheLoadedWeights) {
  const auto j = run_json(with_checkpoint() + " --mode flat,sliding,ttt-sgd,ttt-adamw --mode ttt-lora,ttt-phased");
  EXPECT_EQ(j["val_targets"].get<int64_t>(), flat_.targets);
  EXPECT_EQ(j["seq_len"].get<int64_t>(), 128);
  const auto& modes = j["modes"];
  ASSERT_EQ(modes.size(), 6u);
  const std::vector<std::string> names = {"flat", "sliding", "ttt-sgd", "ttt-adamw", "ttt-lora", "ttt-phased"};
  for (size_t i = 0; i < names.size(); ++i) {
    const auto& m = modes[i];
    EXPECT_EQ(m["mode"], names[i]);
    EXPECT_EQ(m["tokens"].get<int64_t>() - m["rescored"].get<int64_t>(), flat_.targets) << names[i];
    EXPECT_EQ(m["unscored"].get<int64_t>(), 0) << names[i];
    EXPECT_TRUE(m["legal"].get<bool>());
    EXPECT_TRUE(m["complete"].get<bool>());
    const double bpb = m["val_bpb"].get<double>();
    EXPECT_GT(bpb, 1.0);
    EXPECT_LT(bpb, 10.0);
  }
  // The flat score counts the flat stream's bytes.
  EXPECT_EQ(modes[0]["bytes"].get<int64_t>(), flat_.bytes);
  // The TTT modes start from the loaded weights: running one alone gives the same number.
  const auto alone = run_json(with_checkpoint() + " --mode ttt-lora");
  EXPECT_EQ(alone["modes"][0]["val_loss"].get<double>(), modes[4]["val_loss"].get<double>());
}

TEST_F(EvalCli, ArtifactIsDequantizedAndPreEvalIsLabelled) {
  const auto pack = test::run_pgolf("pack --checkpoint " + (dir_ / "ck.safetensors").string() + " --preset " +
                                    (dir_ / "tiny.toml").string() + " --out " + (dir_ / "a.pgolf").string());
  ASSERT_EQ(pack.status, 0) << pack.output;
  const auto art = run_json("eval --artifact " + (dir_ / "a.pgolf").string() + common() + " --mode flat");
  const auto ck = run_json(with_checkpoint() + " --mode flat");
  EXPECT_GE(art["dequantize_seconds"].get<double>(), 0.0);
  // int8 per-row quantization of the tiny model: close to the float score, not identical.
  const double a = art["modes"][0]["val_bpb"].get<double>(), f = ck["modes"][0]["val_bpb"].get<double>();
  EXPECT_NE(a, f);
  EXPECT_NEAR(a, f, 0.02 * f);
  // The pre-evaluation form: every output says it is not legal.
  const auto text = test::run_pgolf(with_checkpoint() + " --set ttt_pre_eval=true --mode ttt-adamw");
  ASSERT_EQ(text.status, 0) << text.output;
  EXPECT_THAT(text.output, HasSubstr("NOT LEGAL (non-record: trains on validation tokens before scoring them) "
                                     "ttt-adamw-pre-eval val_loss:"));
  const auto j = run_json(with_checkpoint() + " --set ttt_pre_eval=true --mode ttt-adamw");
  EXPECT_FALSE(j["modes"][0]["legal"].get<bool>());
  EXPECT_THAT(j["modes"][0]["label"].get<std::string>(), HasSubstr("NOT LEGAL"));
}

TEST_F(EvalCli, BadRequestsAreRefusedClearly) {
  auto r = test::run_pgolf(with_checkpoint() + " --mode sideways");
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("unknown evaluation mode \"sideways\""));
  r = test::run_pgolf("eval --checkpoint " + (dir_ / "ck.safetensors").string() + common());
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, HasSubstr("--preset is required"));
}

}  // namespace
