// The Optimizer facade: save / restore of its state through a safetensors round trip continues the
// run bit for bit; mismatched state fails loudly; the Muon step is what SPEC §4.2 writes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/half.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

// A preset at the golden small size (d 64, 4 heads, 2 KV heads).
Config small_preset(const std::string& preset) {
  Config c = Config::load(preset);
  for (const char* kv : {"vocab_size=1024", "model_dim=64", "num_heads=4", "num_kv_heads=2", "rope_dims=8"})
    c.set_from_string(kv);
  if (c.get_int("bigram_vocab_size") > 0) c.set_from_string("bigram_dim=16");
  if (c.get_bool("ve_enabled")) c.set_from_string("ve_dim=16");
  return c;
}

void fill_normal(std::span<float> v, Rng& rng, double scale) {
  for (float& x : v) x = static_cast<float>(scale * rng.normal());
}

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct TrainingRun {
  Config config;
  ParamLayout layout;
  Schedule schedule;
  ParamSet<float> params;
  Optimizer optimizer;

  explicit TrainingRun(const std::string& preset)
      : config(small_preset(preset)),
        layout(param_specs(ModelConfig::from_config(config))),
        schedule(Schedule::from_config(config)),
        params(layout),
        optimizer(layout, OptimizerConfig::from_config(config)) {
    Rng rng(7);
    fill_normal(params.all(), rng, 0.1);
  }
  // Step k with gradients drawn from a seed that depends only on k, 100 ms per step.
  void step(int64_t k) {
    ParamSet<float> grads(layout);
    Rng rng(1000 + static_cast<uint64_t>(k));
    fill_normal(grads.all(), rng, 0.01);
    const double elapsed = 100.0 * static_cast<double>(k);
    optimizer.step(params, grads, k, schedule.lr_scale(k, elapsed), schedule.muon_momentum(k));
  }
};

class OptimizerState : public ::testing::TestWithParam<std::string> {};

TEST_P(OptimizerState, SaveAndRestoreContinuesBitExactly) {
  TrainingRun a(GetParam());
  for (int64_t k = 0; k < 3; ++k) a.step(k);
  // The checkpoint: parameters and optimizer state in one safetensors file image.
  TensorMap ckpt = a.params.to_tensors();
  const TensorMap state = a.optimizer.state_tensors();
  for (const std::string& n : state.names()) ckpt.set(n, state.get(n));
  const TensorMap loaded = parse_safetensors(serialize_safetensors(ckpt), "checkpoint");

  TrainingRun b(GetParam());  // fresh state, different steps taken
  b.step(0);
  b.params.load_tensors(loaded, "checkpoint");
  b.optimizer.load_state_tensors(loaded, "checkpoint");
  EXPECT_EQ(b.optimizer.steps_taken(), 3);
  for (int64_t k = 3; k < 5; ++k) {
    a.step(k);
    b.step(k);
  }
  EXPECT_TRUE(same_bits(a.params.all(), b.params.all()));
  const TensorMap sa = a.optimizer.state_tensors(), sb = b.optimizer.state_tensors();
  ASSERT_EQ(sa.names(), sb.names());
  for (const std::string& n : sa.names()) EXPECT_EQ(sa.get(n).bytes, sb.get(n).bytes) << n;
}

TEST_P(OptimizerState, MismatchedStateFailsAndLeavesTheOptimizerUnchanged) {
  TrainingRun a(GetParam());
  a.step(0);
  EXPECT_THROW(a.step(5), Error);  // step index does not follow the state

  TensorMap state = a.optimizer.state_tensors();
  TensorMap extra = state;
  extra.set("optim/not_a_param/exp_avg", HostTensor(DType::F32, {2}));
  TrainingRun b(GetParam());
  EXPECT_THROW(b.optimizer.load_state_tensors(extra, "checkpoint"), Error);
  EXPECT_EQ(b.optimizer.steps_taken(), 0);
  TensorMap missing = state;
  missing.erase(state.names().front());
  EXPECT_THROW(b.optimizer.load_state_tensors(missing, "checkpoint"), Error);
  EXPECT_EQ(b.optimizer.steps_taken(), 0);
}

INSTANTIATE_TEST_SUITE_P(Presets, OptimizerState, ::testing::Values("s691", "s1560"));

// The banked path keeps its momentum in bf16; the per-matrix path in fp32.
TEST(OptimizerState, MomentumBufferPrecisionFollowsTheReference) {
  TrainingRun banked("s1560");
  TrainingRun per_matrix("s691");
  for (int64_t k = 0; k < 2; ++k) {
    banked.step(k);
    per_matrix.step(k);
  }
  size_t not_bf16 = 0;
  for (size_t m = 0; m < banked.optimizer.muon().members().size(); ++m)
    for (float x : banked.optimizer.muon().momentum_buffer(m)) not_bf16 += x != round_to_bf16(x);
  EXPECT_EQ(not_bf16, 0u);
  not_bf16 = 0;
  for (size_t m = 0; m < per_matrix.optimizer.muon().members().size(); ++m)
    for (float x : per_matrix.optimizer.muon().momentum_buffer(m)) not_bf16 += x != round_to_bf16(x);
  EXPECT_GT(not_bf16, 1000u);
}

// SPEC §4.2 on one tall matrix and one bank, fp32, row normalisation on: after one step from a zero
// buffer, u = g + μ·g, each row of u is normalised, and W ← W·(1 − lr·wd) − lr·scale·NS(u) with NS
// per bank slice.
TEST(Muon, FirstStepIsTheDecayedOrthogonalisedGradient) {
  const ParamLayout layout({{"tall.weight", {24, 8}, ParamGroup::Matrix, InitKind::Zeros},
                            {"bank", {2, 8, 24}, ParamGroup::Matrix, InitKind::Zeros}});
  ParamSet<float> params(layout), grads(layout);
  Rng rng(3);
  fill_normal(params.all(), rng, 0.1);
  fill_normal(grads.all(), rng, 0.01);
  MuonOptions o;
  o.lr = 0.02;
  o.weight_decay = 0.1;
  o.row_normalize = true;
  o.numerics = MuonNumerics::F32;
  Muon muon(layout, {0, 1}, o);
  const ParamSet<float> before = params;
  const double mu = 0.92, lr_scale = 0.5, lr = o.lr * lr_scale;
  muon.step(params, grads, lr_scale, mu);

  for (size_t i = 0; i < 2; ++i) {
    const ParamSpec& s = layout.spec(i);
    const int64_t slices = i == 0 ? 1 : 2, rows = i == 0 ? 24 : 8, cols = i == 0 ? 8 : 24;
    std::vector<float> u(grads[i].begin(), grads[i].end());
    for (float& x : u) x = x + static_cast<float>(mu) * x;  // buf = g; u = g + μ·buf
    for (int64_t r = 0; r < slices * rows; ++r) {  // row normalisation applies to every member
      double ss = 0.0;
      for (int64_t j = 0; j < cols; ++j) ss += static_cast<double>(u[r * cols + j]) * u[r * cols + j];
      for (int64_t j = 0; j < cols; ++j) u[r * cols + j] /= static_cast<float>(std::sqrt(ss));
    }
    newton_schulz_batched(u, slices, rows, cols, 5, MuonNumerics::F32,
                          i == 0 ? NsForm::ScaleThenSquare : NsForm::SquareThenScale);
    const double scale = i == 0 ? std::sqrt(3.0) : 1.0;
    for (size_t k = 0; k < u.size(); ++k) {
      const double want = before[i][k] * (1.0 - lr * o.weight_decay) - lr * scale * u[k];
      // Two fp32 roundings (decay, fused step) of |w| < 0.5: at most 2 ulps = 6e-8.
      EXPECT_NEAR(params[i][k], want, 6e-8) << s.name << " [" << k << "]";
    }
  }
  EXPECT_THROW(Muon(ParamLayout({{"v", {4}, ParamGroup::Matrix, InitKind::Zeros}}), {0}, o), Error);
}

}  // namespace
