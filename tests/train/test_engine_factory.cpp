// make_engine and `pgolf bench` on the CPU engine (the CUDA engine's tests are in tests/cuda).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "dist/communicator.h"
#include "model/engine_factory.h"
#include "model/tiny_models.h"
#include "test_util.h"

using namespace pgolf;

TEST(EngineFactory, BuildsTheCpuEngineAndRefusesUnknownDevices) {
  const Config c = test::tiny_preset("baseline");
  auto comm = make_single_process_communicator();
  auto e = make_engine(c, *comm, "cpu");
  EXPECT_STREQ(e->backend_name(), "cpu");
  EXPECT_EQ(e->layout().count(), param_count(ModelConfig::from_config(c)));
  EXPECT_THROW(make_engine(c, *comm, "tpu"), Error);
  if (!cuda_available()) EXPECT_THROW(make_engine(c, *comm, "cuda"), Error);
}

TEST(EngineFactory, DefaultMaxTokensIsTheLargerOfTheMicroBatchAndATttBatch) {
  Config c = Config::load("s691");  // 786,432 tokens over 8 / world accumulation steps; TTT 32 x 2048
  EXPECT_EQ(default_max_tokens(c, 1), 98304);
  EXPECT_EQ(default_max_tokens(c, 8), 98304);
  c.set("grad_accum_steps", int64_t{1});
  EXPECT_EQ(default_max_tokens(c, 1), 786432);
  c.set("train_batch_tokens", int64_t{8192});
  EXPECT_EQ(default_max_tokens(c, 1), 65536);
  // s1560 scores with LoRA TTT: 64 documents x 2048 tokens, more than its micro-batch.
  Config s1560 = Config::load("s1560");
  EXPECT_EQ(default_max_tokens(s1560, 8), 131072);
  s1560.set("eval_modes", std::vector<std::string>{"flat"});
  EXPECT_EQ(default_max_tokens(s1560, 8), 98304);
}

TEST(BenchCommand, TimesACpuTrainingStepAndReportsJson) {
  const std::string args =
      "bench --preset s691 --device cpu --set num_layers=2 --set model_dim=64 --set num_heads=2 --set num_kv_heads=1 "
      "--set bigram_dim=32 --set ve_dim=32 --set ve_layers=[1] --set xsa_last_n=1 --seq-len 64 --batch-tokens 256 "
      "--steps 2 --warmup 1 --json";
  const auto r = test::run_pgolf(args);
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("device"), "cpu");
  EXPECT_EQ(j.at("tokens_per_step").get<int64_t>(), 256);
  EXPECT_EQ(j.at("seq_len").get<int64_t>(), 64);
  EXPECT_EQ(j.at("layers").get<int64_t>(), 2);
  Config c = Config::load("s691");
  for (const char* kv : {"num_layers=2", "model_dim=64", "num_heads=2", "num_kv_heads=1", "bigram_dim=32", "ve_dim=32",
                         "ve_layers=[1]", "xsa_last_n=1"})
    c.set_from_string(kv);
  EXPECT_EQ(j.at("params").get<int64_t>(), param_count(ModelConfig::from_config(c)));
  const double tokens_per_s = j.at("tokens_per_s").get<double>(), ms = j.at("ms_per_step").get<double>();
  EXPECT_GT(ms, 0.0);
  EXPECT_NEAR(tokens_per_s, 256.0 / (ms * 1e-3), 1e-6 * tokens_per_s);
  EXPECT_GT(j.at("eval_tokens_per_s").get<double>(), 0.0);
  EXPECT_FALSE(j.contains("optimizer_ms")) << "the optimizer step alone is timed on the GPU only";
}

TEST(BenchCommand, RejectsABatchThatIsNotAMultipleOfTheSequenceLength) {
  const auto r = test::run_pgolf("bench --preset baseline --device cpu --seq-len 64 --batch-tokens 100 --steps 1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("multiple"), std::string::npos) << r.output;
}

// --looping runs s1560's recurrent plan: 5 physical layers, layers 1-2 twice more = 9 virtual layers,
// and the MFU counts the repeated blocks' matrices once per pass.
TEST(BenchCommand, LoopingCountsTheVirtualLayers) {
  const std::string small =
      "bench --preset s1560 --device cpu --set num_layers=5 --set model_dim=64 --set num_heads=2 --set num_kv_heads=1 "
      "--set vocab_size=256 --set loop_start=1 --set loop_end=2 --set parallel_start_layer=3 --set xsa_last_n=5 "
      "--seq-len 64 --batch-tokens 128 --steps 1 --warmup 0 --json";
  const auto plain = test::run_pgolf(small);
  const auto looped = test::run_pgolf(small + " --looping");
  ASSERT_EQ(plain.status, 0) << plain.output;
  ASSERT_EQ(looped.status, 0) << looped.output;
  const nlohmann::json a = nlohmann::json::parse(plain.output), b = nlohmann::json::parse(looped.output);
  EXPECT_EQ(a.at("layers").get<int64_t>(), 5);
  EXPECT_FALSE(a.at("looping").get<bool>());
  EXPECT_EQ(b.at("layers").get<int64_t>(), 9);
  EXPECT_TRUE(b.at("looping").get<bool>());
  // FLOPs per token = MFU · 989e12 / tokens/s: 4 extra block passes of 64·(2·64 + 2·32) + 2·64·256 each
  // (head dim 32: q 64, k and v 32 wide), plus 4 more layers of the attention term 6·d·T.
  const auto flops = [](const nlohmann::json& j) {
    return j.at("mfu").get<double>() * 989e12 / j.at("tokens_per_s").get<double>();
  };
  const double block = 64.0 * (2 * 64 + 2 * 32) + 2.0 * 64 * 256;
  EXPECT_NEAR(flops(b) - flops(a), 6.0 * 4 * block + 6.0 * 4 * 64 * 64, 1e-6 * flops(b));

  const auto refused = test::run_pgolf("bench --preset s691 --device cpu --seq-len 64 --batch-tokens 64 --steps 1 --looping");
  EXPECT_NE(refused.status, 0);
  EXPECT_NE(refused.output.find("num_loops"), std::string::npos) << refused.output;
}
