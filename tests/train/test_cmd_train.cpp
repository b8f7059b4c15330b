#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "trainer_fixture.h"

using namespace pgolf;

namespace {

std::string quoted(const std::filesystem::path& p) {
  std::string q = "'";
  q += p.string();
  q += '\'';
  return q;
}

// train_loss of every "train" object of metrics.jsonl, in file order (a resumed run appends).
std::vector<std::pair<int64_t, double>> logged_losses(const std::filesystem::path& metrics) {
  std::ifstream f(metrics);
  std::vector<std::pair<int64_t, double>> out;
  for (std::string line; std::getline(f, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j["event"] == "train") out.emplace_back(j["step"].get<int64_t>(), j["train_loss"].get<double>());
  }
  return out;
}

}  // namespace

// `pgolf train` on the tiny preset (small batch), then `--resume` from its step-2 checkpoint with
// the configuration stored in the checkpoint: the resumed steps log the same losses, bit for bit.
TEST(CmdTrain, TrainsAndResumesFromACheckpoint) {
  test::TempDir data, run;
  test::write_synthetic_shards(data.path());
  const std::string common = " --threads 1";
  const std::string args =
      "train --preset tiny --data " + quoted(data / "train_*.bin") + " --val " + quoted(test::val_prefix_shard()) +
      " --tokenizer " + quoted(test::sp1024_model()) + " --out " + quoted(run.path()) + common +
      " --set train_seq_len=32 --set train_batch_tokens=256 --set iterations=4 --set warmdown_iters=2"
      " --set val_loss_every=2 --set val_batch_tokens=256 --set val_max_tokens=128 --set checkpoint_every=2";
  const auto first = test::run_pgolf(args);
  ASSERT_EQ(first.status, 0) << first.output;
  EXPECT_NE(first.output.find("step:4/4 val_loss:"), std::string::npos) << first.output;
  EXPECT_NE(first.output.find("DIAGNOSTIC post_ema val_loss:"), std::string::npos) << first.output;
  for (const char* f : {"config.toml", "train.log", "metrics.jsonl", "final_model.safetensors",
                        "checkpoints/step_000002.safetensors", "checkpoints/step_000004.safetensors"})
    EXPECT_TRUE(std::filesystem::exists(run / f)) << f;

  const auto second = test::run_pgolf("train --resume " + quoted(run / "checkpoints/step_000002.safetensors") + common);
  ASSERT_EQ(second.status, 0) << second.output;
  EXPECT_NE(second.output.find("resumed:step:2"), std::string::npos) << second.output;

  // metrics.jsonl: steps 1-4 of the first run, then 3-4 of the resumed one.
  const auto losses = logged_losses(run / "metrics.jsonl");
  ASSERT_EQ(losses.size(), 6u);
  std::map<int64_t, double> first_run(losses.begin(), losses.begin() + 4);
  for (size_t i = 4; i < 6; ++i) {
    EXPECT_EQ(losses[i].first, static_cast<int64_t>(i - 1));
    EXPECT_EQ(losses[i].second, first_run.at(losses[i].first)) << "step " << losses[i].first;
  }
}

TEST(CmdTrain, HelpListsTheOptionsAndEveryKey) {
  const auto r = test::run_pgolf("train --help");
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* s : {"--preset", "--set", "--data", "--val", "--tokenizer", "--out", "--resume", "--threads",
                        "checkpoint_every=0", "val_max_tokens=0", "matrix_lr=0.04", "train_loader=\"stream\""})
    EXPECT_NE(r.output.find(s), std::string::npos) << s;
}

TEST(CmdTrain, ResumeWithoutARunDirectoryNeedsOut) {
  test::TempDir dir;
  const auto r = test::run_pgolf("train --resume " + quoted(dir / "missing.safetensors"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("missing.safetensors"), std::string::npos) << r.output;
}

// --one-gpu gives each step one GPU's share of the preset's batch (tiny: 8,192 / 8 = 1,024 tokens)
// with no accumulation, and the resolved configuration written beside the run says so (a --set
// still has the last word); a batch that does not divide is refused.
TEST(CmdTrain, OneGpuProtocolDividesTheBatch) {
  test::TempDir data, run;
  test::write_synthetic_shards(data.path());
  const std::string args =
      "train --preset tiny --one-gpu --data " + quoted(data / "train_*.bin") + " --val " +
      quoted(test::val_prefix_shard()) + " --tokenizer " + quoted(test::sp1024_model()) + " --out " +
      quoted(run.path()) + " --threads 1 --set iterations=1 --set val_loss_every=0 --set val_batch_tokens=512" +
      " --set val_max_tokens=512";
  const auto r = test::run_pgolf(args);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("grad_accum_steps:1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("train_batch_tokens:1024 "), std::string::npos) << r.output;
  std::ifstream cfg(run / "config.toml");
  const std::string text((std::istreambuf_iterator<char>(cfg)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("train_batch_tokens = 1024"), std::string::npos) << text;
  EXPECT_NE(text.find("grad_accum_steps = 1"), std::string::npos) << text;

  // 2,000 / 8 = 250 tokens is not a whole number of 32-token sequences.
  test::TempDir presets;
  std::ofstream(presets / "odd.toml") << "train_seq_len = 32\ntrain_batch_tokens = 2000\n";
  const auto bad = test::run_pgolf("train --preset " + quoted(presets / "odd.toml") + " --one-gpu");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find("--one-gpu: train_batch_tokens 2000 / 8"), std::string::npos) << bad.output;
}
