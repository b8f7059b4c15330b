#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>
#include <functional>
#include <chrono>

#include "core/safetensors.h"
#include "dist/communicator.h"
#include "train/cpu_engine.h"
#include "train/trainer.h"
#include "trainer_fixture.h"

using namespace pgolf;

namespace {

TrainResult run_one_rank(const Config& c, const TrainOptions& options = {}) {
  auto comm = make_single_process_communicator();
  CpuEngine engine(c, *comm);
  return train(engine, *comm, c, options);
}

// Every rank's result of a run on `world` thread ranks.
std::vector<TrainResult> run_ranks(const Config& c, int world) {
  std::vector<TrainResult> results(static_cast<size_t>(world));
  run_thread_group(world, [&](Communicator& comm) {
    CpuEngine engine(c, comm);
    results[comm.rank()] = train(engine, comm, c, {});
  });
  return results;
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// b equals a[a_from, a_from + b.size()) exactly; without a_from, b is all of a.
// Under Parallel Muon the gradient norm is each rank's local one: compare it only where it is global.
void expect_same_steps(const std::vector<StepRecord>& a, const std::vector<StepRecord>& b, size_t a_from = 0,
                       bool same_grad_norm = true) {
  if (a_from == 0) {
    ASSERT_EQ(a.size(), b.size());
  }
  ASSERT_GE(a.size(), a_from + b.size());
  for (size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(a[a_from + i].step, b[i].step);
    EXPECT_EQ(a[a_from + i].train_loss, b[i].train_loss) << "step " << b[i].step;
    if (same_grad_norm) {
      EXPECT_EQ(a[a_from + i].grad_norm, b[i].grad_norm) << "step " << b[i].step;
    }
    EXPECT_EQ(a[a_from + i].lr_scale, b[i].lr_scale) << "step " << b[i].step;
    EXPECT_EQ(a[a_from + i].qat, b[i].qat) << "step " << b[i].step;
    EXPECT_EQ(a[a_from + i].looping, b[i].looping) << "step " << b[i].step;
  }
}

// The CPU engine behind the trainer's pipelined step calls, watching them: at most kMaxTrainPending steps
// pending, and no call but the next step's submission and its mode switches while one is (what the CUDA
// engine requires). Steps run at submission (Engine's default), so results match the unwatched engine.
class StepPipelineWatch final : public Engine {
 public:
  explicit StepPipelineWatch(CpuEngine& inner) : inner_(inner) {}
  int most_pending = 0;                  // the deepest the pipeline went
  mutable std::vector<std::string> violations;  // calls made while a step was pending

  const ModelConfig& model_config() const override { return inner_.model_config(); }
  const ParamLayout& layout() const override { return inner_.layout(); }
  const char* backend_name() const override { return inner_.backend_name(); }
  void load_params(const ParamSet<float>& p) override { idle("load_params"), inner_.load_params(p); }
  void store_params(ParamSet<float>& p) const override { idle("store_params"), inner_.store_params(p); }
  TensorMap optimizer_state() const override { return idle("optimizer_state"), inner_.optimizer_state(); }
  void load_optimizer_state(const TensorMap& s, const std::string& w) override {
    idle("load_optimizer_state"), inner_.load_optimizer_state(s, w);
  }
  void init_ema() override { idle("init_ema"), inner_.init_ema(); }
  void store_ema(ParamSet<float>& out) const override { idle("store_ema"), inner_.store_ema(out); }
  void set_looping(bool on) override { inner_.set_looping(on); }
  void set_qat(bool on) override { inner_.set_qat(on); }
  std::function<void(const StepControl&)> before_step;  // e.g. a step that stalls
  bool in_step = false;  // inside a step's own work (its collectives are part of it)
  StepResult train_step(std::span<const Batch> b, const StepControl& c) override {
    if (before_step) before_step(c);
    in_step = true;
    StepResult r = inner_.train_step(b, c);
    in_step = false;
    return r;
  }
  void submit_train_step(std::span<const Batch> b, const StepControl& c) override {
    Engine::submit_train_step(b, c);
    most_pending = std::max(most_pending, train_steps_pending());
  }
  void token_losses(const Batch& b, std::vector<float>& nll) override { idle("token_losses"), inner_.token_losses(b, nll); }
  void submit_token_losses(const Batch& b) override { idle("submit_token_losses"), Engine::submit_token_losses(b); }
  void ttt_begin(const TttOptimizerConfig& c) override { idle("ttt_begin"), inner_.ttt_begin(c); }
  double ttt_step(const Batch& b, double lr) override { return idle("ttt_step"), inner_.ttt_step(b, lr); }
  void ttt_end() override { inner_.ttt_end(); }
  void lora_begin(const LoraConfig& l, int64_t rows, const LoraOptimizerConfig& o) override {
    idle("lora_begin"), inner_.lora_begin(l, rows, o);
  }
  void lora_reset(uint64_t seed) override { inner_.lora_reset(seed); }
  void lora_score_and_train(const Batch& b, std::span<const float> w, std::vector<float>& nll) override {
    idle("lora_score_and_train"), inner_.lora_score_and_train(b, w, nll);
  }
  void lora_train_step(const Batch& b, std::span<const float> w) override { inner_.lora_train_step(b, w); }
  void lora_end() override { inner_.lora_end(); }
  void accumulate_hessians(const Batch& b, TensorMap& h) override { idle("accumulate_hessians"), inner_.accumulate_hessians(b, h); }

 private:
  void idle(const char* call) const {
    if (train_steps_pending() > 0) violations.push_back(call);
  }
  CpuEngine& inner_;
};

// A rank's communicator that notes the host collectives the trainer makes while a training step is
// pending (outside the step's own work): on NCCL they would wait behind that step on the engine's
// stream, so a pipelined run on several ranks must make none.
class HostCollectiveWatch final : public Communicator {
 public:
  HostCollectiveWatch(Communicator& inner, const StepPipelineWatch& engine) : inner_(inner), engine_(engine) {}
  std::vector<std::string> violations;

  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    inner_.all_reduce(data, count, dtype, op);
  }
  void reduce_scatter(const void* in, void* out, size_t count, DType dtype, ReduceOp op) override {
    inner_.reduce_scatter(in, out, count, dtype, op);
  }
  void all_gather(const void* in, void* out, size_t count, DType dtype) override {
    inner_.all_gather(in, out, count, dtype);
  }
  void broadcast(void* data, size_t count, DType dtype, int root) override { inner_.broadcast(data, count, dtype, root); }
  void barrier() override { note("barrier"), inner_.barrier(); }
  void all_reduce_host(double* data, size_t count, ReduceOp op) override {
    note("all_reduce_host"), inner_.all_reduce_host(data, count, op);
  }
  int64_t fetch_add(int64_t inc) override { return inner_.fetch_add(inc); }
  void reset_counter(int64_t value) override { inner_.reset_counter(value); }

 private:
  void note(const char* what) {
    if (!engine_.in_step && engine_.train_steps_pending() > 0) violations.push_back(what);
  }
  Communicator& inner_;
  const StepPipelineWatch& engine_;
};

std::vector<std::string> read_lines(const fs::path& p) {
  std::ifstream f(p);
  std::vector<std::string> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(l);
  return lines;
}

}  // namespace

TEST(Trainer, TwoRunsWithTheSameSeedAreIdentical) {
  test::TempDir dir;
  test::write_synthetic_shards(dir.path());
  const Config c = test::tiny_run_config("s691", dir.path());
  const TrainResult a = run_one_rank(c), b = run_one_rank(c);
  expect_same_steps(a.steps, b.steps);
  ASSERT_EQ(a.steps.size(), 8u);
  EXPECT_EQ(max_abs_diff(a.final_params.all(), b.final_params.all()), 0.0);
  ASSERT_EQ(a.validations.size(), 3u);  // steps 0, 4 and 8
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(a.validations[i].val.val_bpb, b.validations[i].val.val_bpb);
  // The initial model is close to uniform over the 1024 ids (tied embeddings of std 0.005), and the
  // run learns: the last step's loss is below the first.
  EXPECT_NEAR(a.steps.front().train_loss, std::log(1024.0), 0.05);
  EXPECT_LT(a.steps.back().train_loss, a.steps.front().train_loss);
}

// Iteration-based schedules (no cap): lr scale, momentum warm-up and the late-QAT latch (s691), the
// fraction warmdown and the loop switch (s1560), read back from the steps the trainer ran.
TEST(Trainer, ScheduleValuesAtChosenSteps) {
  test::TempDir dir;
  test::write_synthetic_shards(dir.path());
  Config c = test::tiny_run_config("s691", dir.path());
  c.set("iterations", int64_t{10});
  c.set("warmdown_iters", int64_t{4});
  c.set("late_qat_threshold", 0.6);
  c.set("val_loss_every", int64_t{0});
  const TrainResult r = run_one_rank(c);
  ASSERT_EQ(r.steps.size(), 10u);
  // Step index k (record k + 1): scale 1 until the last 4 iterations, then (10 − k) / 4.
  const double scale[10] = {1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25};
  for (int k = 0; k < 10; ++k) {
    EXPECT_EQ(r.steps[k].step, k + 1);
    EXPECT_DOUBLE_EQ(r.steps[k].lr_scale, scale[k]) << k;
    // Momentum 0.92 -> 0.99 over 4 steps.
    EXPECT_DOUBLE_EQ(r.steps[k].muon_momentum, (1.0 - std::min(k / 4.0, 1.0)) * 0.92 + std::min(k / 4.0, 1.0) * 0.99);
    // QAT from the first scale below 0.6 (index 8) on, and never off again.
    EXPECT_EQ(r.steps[k].qat, k >= 8) << k;
  }
  EXPECT_TRUE(r.final_state.qat);

  Config s = test::tiny_run_config("s1560", dir.path());
  s.set("iterations", int64_t{10});
  s.set("val_loss_every", int64_t{0});
  const TrainResult q = run_one_rank(s);
  ASSERT_EQ(q.steps.size(), 10u);
  for (int k = 0; k < 10; ++k) {
    // warmdown_frac 0.75: 1 while k/10 < 0.25, then (1 − k/10) / 0.75.
    const double frac = k / 10.0;
    EXPECT_DOUBLE_EQ(q.steps[k].lr_scale, frac < 0.25 ? 1.0 : (1.0 - frac) / 0.75) << k;
    // Looping from the first step whose fraction reaches 0.35 (index 4).
    EXPECT_EQ(q.steps[k].looping, k >= 4) << k;
    EXPECT_FALSE(q.steps[k].qat);
  }
}

// Run N steps; run again with checkpoints every 3 steps and stop ("kill") after step 4; resume from
// the step-3 checkpoint to N. Every step after the resume point equals the uninterrupted run's, bit
// for bit, and so do the validations and the averaged output weights. Covers the EMA and late QAT
// (s691), SWA (s562) and document packing, looping and Parallel Muon state (s1560).
TEST(Trainer, KillAndResumeIsBitIdentical) {
  test::TempDir data;
  test::write_synthetic_shards(data.path());
  for (std::string stack : {"s691", "s562", "s1560"}) {
    SCOPED_TRACE(stack);
    Config c = test::tiny_run_config(stack, data.path());
    c.set("late_qat_threshold", stack == "s1560" ? 0.0 : 0.6);
    if (stack == "s562") {
      c.set("swa_start_frac", 0.9);
      c.set("swa_every", int64_t{2});
    }
    const TrainResult full = run_one_rank(c);

    test::TempDir run;
    c.set("checkpoint_every", int64_t{3});
    TrainOptions first;
    first.run_dir = run.path();
    first.stop_after_steps = 4;
    const TrainResult killed = run_one_rank(c, first);
    EXPECT_TRUE(killed.stopped_early);
    EXPECT_EQ(killed.final_state.step, 4);
    ASSERT_EQ(killed.steps.size(), 4u);
    for (size_t i = 0; i < 4; ++i) EXPECT_EQ(killed.steps[i].train_loss, full.steps[i].train_loss);

    const Checkpoint ck = load_checkpoint(checkpoint_path(run.path(), 3));
    EXPECT_EQ(ck.state.step, 3);
    TrainOptions again;
    again.run_dir = run.path();
    again.resume = &ck;
    const TrainResult resumed = run_one_rank(c, again);
    EXPECT_FALSE(resumed.stopped_early);
    expect_same_steps(full.steps, resumed.steps, 3);
    ASSERT_EQ(resumed.validations.size(), 2u);  // steps 4 and 8
    EXPECT_EQ(resumed.validations[0].val.val_loss, full.validations[1].val.val_loss);
    EXPECT_EQ(resumed.validations[1].val.val_loss, full.validations[2].val.val_loss);
    EXPECT_EQ(resumed.averaging, full.averaging);
    EXPECT_EQ(max_abs_diff(resumed.final_params.all(), full.final_params.all()), 0.0);
    if (stack == "s562") {
      EXPECT_EQ(full.averaging, "swa");
    }
  }
}

TEST(Trainer, ResumeChecksTheKeysThatShapeTraining) {
  test::TempDir data, run;
  test::write_synthetic_shards(data.path());
  Config c = test::tiny_run_config("baseline", data.path());
  c.set("iterations", int64_t{2});
  TrainOptions o;
  o.run_dir = run.path();
  run_one_rank(c, o);
  const Checkpoint ck = load_checkpoint(checkpoint_path(run.path(), 2));
  Config changed = c;
  changed.set("matrix_lr", 0.05);
  changed.set("val_loss_every", int64_t{7});  // cadence may change
  try {
    check_resume_config(ck.config, changed, "resume");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("matrix_lr: checkpoint 0.04, now 0.05"), std::string::npos) << m;
    EXPECT_EQ(m.find("val_loss_every"), std::string::npos) << m;
  }
  Config cadence = c;
  cadence.set("val_loss_every", int64_t{7});
  cadence.set("compressor", std::string("zstd"));
  EXPECT_NO_THROW(check_resume_config(ck.config, cadence, "resume"));
}

// 2 and 4 ranks give the losses and weights of 1 rank with 8 accumulation steps, up to the order
// of the gradient reduction; the ranks agree bit for bit. s1560 runs Parallel Muon (bank gradients
// reduce-scattered, momentum sharded: its 10-slice banks are padded for 4 ranks).
TEST(Trainer, RanksMatchOneRankWithAccumulation) {
  test::TempDir data;
  test::write_synthetic_shards(data.path());
  for (std::string stack : {"s691", "s1560"}) {
    SCOPED_TRACE(stack);
    Config c = test::tiny_run_config(stack, data.path());
    // fp32 Newton–Schulz: in the references' bf16 numerics a 1-ulp gradient difference can flip a
    // bf16 rounding and move a weight by ~1e-3 of its update, which would hide real mistakes.
    c.set("muon_ns_dtype", std::string("fp32"));
    // s1560 clips each rank's local gradient, which is by design not the accumulated one's clip.
    if (stack == "s1560") c.set("grad_clip_norm", 0.0);
    const TrainResult one = run_one_rank(c);
    for (int world : {2, 4}) {
      SCOPED_TRACE(world);
      const std::vector<TrainResult> ranks = run_ranks(c, world);
      for (int r = 1; r < world; ++r) {
        expect_same_steps(ranks[0].steps, ranks[r].steps, 0, stack != "s1560");
        EXPECT_EQ(max_abs_diff(ranks[0].final_params.all(), ranks[r].final_params.all()), 0.0);
        EXPECT_EQ(ranks[0].validations.back().val.val_loss, ranks[r].validations.back().val.val_loss);
      }
      ASSERT_EQ(ranks[0].steps.size(), one.steps.size());
      // Gradients differ only by the rounding of the reduction (the ranks' sum in fp64 then fp32 vs
      // fp32 accumulation on one rank): about one fp32 ulp. Over 8 steps that stays within a few ulps
      // of the weights (|w| ≲ 1, ulp 1.2e-7) and of the losses.
      for (size_t i = 0; i < one.steps.size(); ++i)
        EXPECT_NEAR(ranks[0].steps[i].train_loss, one.steps[i].train_loss, 1e-6 * one.steps[i].train_loss) << i;
      EXPECT_LT(max_abs_diff(ranks[0].final_params.all(), one.final_params.all()), 1e-6);
      EXPECT_NEAR(ranks[0].validations.back().val.val_loss, one.validations.back().val.val_loss, 1e-6);
    }
  }
}

// train.log holds the references' lines; metrics.jsonl one object per metric line with the values
// the trainer returned; the run directory holds the resolved config, the final weights under the
// reference names and the end-of-run checkpoint.
TEST(Trainer, LogLinesMetricsAndRunDirectory) {
  test::TempDir data, run;
  test::write_synthetic_shards(data.path());
  Config c = test::tiny_run_config("s691", data.path());
  c.set("heldout_files", (data.path() / "heldout_*.bin").string());
  c.set("train_log_every", int64_t{3});
  TrainOptions o;
  o.run_dir = run.path();
  const TrainResult r = run_one_rank(c, o);

  const std::regex train_re(R"(step:(\d+)/8 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms)");
  const std::regex val_re(R"(step:(\d+)/8 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms)");
  const std::regex heldout_re(R"(step:(\d+)/8 heldout_loss:\d+\.\d{4} heldout_bpb:\d+\.\d{4})");
  const std::regex post_re(R"(DIAGNOSTIC post_ema val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms)");
  std::vector<int> train_steps, val_steps, heldout_steps;
  int post = 0;
  for (const std::string& line : read_lines(run / "train.log")) {
    std::smatch m;
    if (std::regex_match(line, m, train_re)) train_steps.push_back(std::stoi(m[1]));
    if (std::regex_match(line, m, val_re)) val_steps.push_back(std::stoi(m[1]));
    if (std::regex_match(line, m, heldout_re)) heldout_steps.push_back(std::stoi(m[1]));
    post += std::regex_match(line, post_re);
  }
  // Every step up to 10, then every train_log_every.
  EXPECT_EQ(train_steps, (std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(val_steps, (std::vector<int>{0, 4, 8}));
  EXPECT_EQ(heldout_steps, (std::vector<int>{0, 4, 8}));
  EXPECT_EQ(post, 1);
  ASSERT_TRUE(r.validations.back().heldout.has_value());
  EXPECT_GT(r.validations.back().heldout->tokens, 0);

  int train_objects = 0, val_objects = 0;
  for (const std::string& line : read_lines(run / "metrics.jsonl")) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j["event"] == "train") {
      const StepRecord& s = r.steps.at(j["step"].get<size_t>() - 1);
      EXPECT_EQ(j["train_loss"].get<double>(), s.train_loss);
      EXPECT_EQ(j["lr_scale"].get<double>(), s.lr_scale);
      EXPECT_EQ(j["grad_norm"].get<double>(), s.grad_norm);
      EXPECT_EQ(j["muon_momentum"].get<double>(), s.muon_momentum);
      EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0);
      EXPECT_GT(j["grad_norm"].get<double>(), 0.0);
      ++train_objects;
    } else if (j["event"] == "val") {
      const ValRecord& v = r.validations.at(static_cast<size_t>(val_objects));
      EXPECT_EQ(j["step"].get<int64_t>(), v.step);
      EXPECT_EQ(j["val_bpb"].get<double>(), v.val.val_bpb);
      EXPECT_EQ(j["heldout_bpb"].get<double>(), v.heldout->val_bpb);
      EXPECT_EQ(j["val_tokens"].get<int64_t>(), 256);
      ++val_objects;
    }
  }
  EXPECT_EQ(train_objects, 8);
  EXPECT_EQ(val_objects, 3);

  EXPECT_TRUE(fs::exists(run / "config.toml"));
  EXPECT_TRUE(fs::exists(checkpoint_path(run.path(), 8)));
  const TensorMap final_model = load_safetensors(run / "final_model.safetensors");
  ASSERT_TRUE(final_model.has("tok_emb.weight"));
  ParamSet<float> loaded(r.final_params.layout());
  loaded.load_tensors(final_model, "final_model", true);
  EXPECT_EQ(max_abs_diff(loaded.all(), r.final_params.all()), 0.0);
}

TEST(Trainer, DivergenceStopsWithTheStepAndTheLoss) {
  test::TempDir data, run;
  test::write_synthetic_shards(data.path());
  Config c = test::tiny_run_config("baseline", data.path());
  c.set("tied_embed_lr", std::nan(""));  // a poisoned learning rate: the embeddings become NaN after step 1
  TrainOptions o;
  o.run_dir = run.path();
  try {
    run_one_rank(c, o);
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(std::regex_search(m, std::regex(R"(step \d+: training loss is (-?nan|-?inf))"))) << m;
  }
  const auto lines = read_lines(run / "train.log");
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines.back().rfind("error: step ", 0), 0u) << lines.back();
}

// The wall-clock cap: the step that reaches it is the last one, then the final validation. A 1 ms
// cap is reached by the first step on any machine (8 forward/backward passes).
TEST(Trainer, WallClockCapStopsAfterTheStepThatReachesIt) {
  test::TempDir data, run;
  test::write_synthetic_shards(data.path());
  Config c = test::tiny_run_config("baseline", data.path());
  c.set("max_wallclock_seconds", 0.001);
  TrainOptions o;
  o.run_dir = run.path();
  const TrainResult r = run_one_rank(c, o);
  ASSERT_EQ(r.steps.size(), 1u);
  EXPECT_EQ(r.final_state.stop_after_step, 1);
  ASSERT_EQ(r.validations.size(), 2u);  // step 0 and the final one at step 1
  EXPECT_EQ(r.validations.back().step, 1);
  bool stopping = false;
  for (const std::string& line : read_lines(run / "train.log"))
    stopping |= std::regex_match(line, std::regex(R"(stopping_early: wallclock_cap train_time:\d+ms step:1/8)"));
  EXPECT_TRUE(stopping);
}

// Pipelined steps (train_lookahead): the next step is submitted before the current one is collected
// except where something between them needs the engine idle (validations every 4 steps, checkpoints
// every 3, SWA snapshots, the last iteration), and the run is the same as one step at a time: every
// step, validation, checkpoint and the output weights, bit for bit. Covers the EMA and late QAT
// (s691), SWA (s562) and the loop switch and document packing (s1560).
TEST(Trainer, PipelinedStepsMatchOneStepAtATime) {
  test::TempDir data;
  test::write_synthetic_shards(data.path());
  for (std::string stack : {"s691", "s562", "s1560"}) {
    SCOPED_TRACE(stack);
    Config c = test::tiny_run_config(stack, data.path());
    c.set("iterations", int64_t{12});
    c.set("checkpoint_every", int64_t{3});
    c.set("late_qat_threshold", stack == "s1560" ? 0.0 : 0.6);
    if (stack == "s562") {
      c.set("swa_start_frac", 0.9);
      c.set("swa_every", int64_t{2});
    }
    TrainResult runs[2];
    test::TempDir dirs[2];
    int most_pending[2] = {};
    for (int ahead = 0; ahead < 2; ++ahead) {
      c.set("train_lookahead", ahead == 1);
      auto comm = make_single_process_communicator();
      CpuEngine inner(c, *comm);
      StepPipelineWatch watch(inner);
      TrainOptions o;
      o.run_dir = dirs[ahead].path();
      runs[ahead] = train(watch, *comm, c, o);
      EXPECT_TRUE(watch.violations.empty()) << watch.violations.front();
      most_pending[ahead] = watch.most_pending;
    }
    EXPECT_EQ(most_pending[0], 1);
    EXPECT_EQ(most_pending[1], 2);
    expect_same_steps(runs[0].steps, runs[1].steps);
    ASSERT_EQ(runs[1].steps.size(), 12u);
    ASSERT_EQ(runs[0].validations.size(), runs[1].validations.size());
    for (size_t i = 0; i < runs[0].validations.size(); ++i) {
      EXPECT_EQ(runs[0].validations[i].step, runs[1].validations[i].step);
      EXPECT_EQ(runs[0].validations[i].val.val_loss, runs[1].validations[i].val.val_loss);
    }
    EXPECT_EQ(runs[0].averaging, runs[1].averaging);
    EXPECT_EQ(max_abs_diff(runs[0].final_params.all(), runs[1].final_params.all()), 0.0);
    for (int64_t step : {3, 6, 9, 12}) {
      const Checkpoint a = load_checkpoint(checkpoint_path(dirs[0].path(), step));
      const Checkpoint b = load_checkpoint(checkpoint_path(dirs[1].path(), step));
      EXPECT_EQ(a.state.loader, b.state.loader) << step;
      EXPECT_EQ(a.state.qat, b.state.qat) << step;
      EXPECT_EQ(a.state.looping, b.state.looping) << step;
    }
  }
}

// Under a cap, the steps run one at a time until every rank knows the cap is far (after the first
// step), and again once it is near: a 1 ms cap is reached by the first step, which stays the last one.
TEST(Trainer, PipelinedStepsKeepTheStopRule) {
  test::TempDir data;
  test::write_synthetic_shards(data.path());
  Config c = test::tiny_run_config("baseline", data.path());
  c.set("max_wallclock_seconds", 0.001);
  auto comm = make_single_process_communicator();
  CpuEngine inner(c, *comm);
  StepPipelineWatch watch(inner);
  const TrainResult r = train(watch, *comm, c, {});
  ASSERT_EQ(r.steps.size(), 1u);
  EXPECT_EQ(r.final_state.stop_after_step, 1);
  EXPECT_EQ(watch.most_pending, 1);
  EXPECT_TRUE(watch.violations.empty());
}

// On several ranks the trainer makes no host collective while a step is pending: each step carries the
// stop rule's flags and the engine reduces them with the step. Under a cap far away (so that the flags
// are in use and the LR scale stays 1), the pipelined run is the one-step-at-a-time run, bit for bit,
// on every rank.
TEST(Trainer, PipelinedStepsOnSeveralRanks) {
  test::TempDir data;
  test::write_synthetic_shards(data.path());
  for (std::string stack : {"s691", "s1560"}) {
    SCOPED_TRACE(stack);
    Config c = test::tiny_run_config(stack, data.path());
    c.set("iterations", int64_t{10});
    c.set("max_wallclock_seconds", 3600.0);
    if (stack == "s1560") c.set("grad_clip_norm", 0.0);
    constexpr int kWorld = 2;
    std::vector<TrainResult> runs[2];
    for (int ahead = 0; ahead < 2; ++ahead) {
      c.set("train_lookahead", ahead == 1);
      runs[ahead].resize(kWorld);
      std::vector<int> most_pending(kWorld);
      std::vector<std::vector<std::string>> violations(kWorld);
      run_thread_group(kWorld, [&](Communicator& comm) {
        CpuEngine inner(c, comm);
        StepPipelineWatch watch(inner);
        HostCollectiveWatch watched(comm, watch);
        runs[ahead][comm.rank()] = train(watch, watched, c, {});
        most_pending[comm.rank()] = watch.most_pending;
        violations[comm.rank()] = watched.violations;
        violations[comm.rank()].insert(violations[comm.rank()].end(), watch.violations.begin(), watch.violations.end());
      });
      for (int r = 0; r < kWorld; ++r) {
        EXPECT_EQ(most_pending[r], ahead == 1 ? 2 : 1) << "rank " << r;
        EXPECT_TRUE(violations[r].empty()) << "rank " << r << ": " << violations[r].front();
      }
    }
    for (int r = 0; r < kWorld; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_EQ(runs[1][r].steps.size(), 10u);
      expect_same_steps(runs[0][r].steps, runs[1][r].steps, 0, stack != "s1560");
      for (const StepRecord& step : runs[1][r].steps) EXPECT_EQ(step.lr_scale, 1.0);
      EXPECT_EQ(max_abs_diff(runs[0][r].final_params.all(), runs[1][r].final_params.all()), 0.0);
      EXPECT_EQ(runs[0][r].validations.back().val.val_loss, runs[1][r].validations.back().val.val_loss);
    }
  }
}

// The stop rule on several ranks: a 1 ms cap is reached by the first step, the last one on every rank;
// and a step that stalls past the cap while the run is pipelined stops it on every rank at the same
// step, at most two steps later (the flags it carried were taken at its submission).
TEST(Trainer, PipelinedStepsKeepTheStopRuleOnSeveralRanks) {
  test::TempDir data;
  test::write_synthetic_shards(data.path());
  Config c = test::tiny_run_config("baseline", data.path());
  constexpr int kWorld = 2;
  for (const bool stall : {false, true}) {
    SCOPED_TRACE(stall ? "a stalled step" : "a 1 ms cap");
    c.set("iterations", int64_t{stall ? 1000 : 8});
    c.set("val_loss_every", int64_t{0});
    c.set("max_wallclock_seconds", stall ? 2.5 : 0.001);
    std::vector<TrainResult> runs(kWorld);
    std::vector<int> most_pending(kWorld);
    run_thread_group(kWorld, [&](Communicator& comm) {
      CpuEngine inner(c, comm);
      StepPipelineWatch watch(inner);
      if (stall)
        watch.before_step = [](const StepControl& control) {
          if (control.step == 3) std::this_thread::sleep_for(std::chrono::milliseconds(2700));
        };
      HostCollectiveWatch watched(comm, watch);
      runs[comm.rank()] = train(watch, watched, c, {});
      most_pending[comm.rank()] = watch.most_pending;
      EXPECT_TRUE(watched.violations.empty()) << "rank " << comm.rank();
    });
    for (int r = 0; r < kWorld; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      expect_same_steps(runs[0].steps, runs[r].steps);
      if (!stall) {
        ASSERT_EQ(runs[r].steps.size(), 1u);
        EXPECT_EQ(runs[r].final_state.stop_after_step, 1);
        EXPECT_EQ(most_pending[r], 1);
      } else {
        EXPECT_EQ(most_pending[r], 2);  // pipelined before the stall
        EXPECT_GE(runs[r].steps.size(), 4u);
        EXPECT_LE(runs[r].steps.size(), 6u);
        EXPECT_EQ(runs[r].final_state.stop_after_step, static_cast<int64_t>(runs[r].steps.size()));
      }
    }
  }
}
