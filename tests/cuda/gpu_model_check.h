// Whole-model comparison of GpuModel (bf16 activations and GEMM operands) with CpuModel<double> on the
// same parameters and batch: loss, per-token losses, the saved activations and every gradient tensor.
//
// Tolerances (relative Frobenius error ‖gpu − ref‖ / ‖ref‖, or absolute for the mean loss). bf16 keeps
// 8 significant bits: one rounding is a relative error of at most 2⁻⁹ ≈ 2e-3. Every block rounds each
// activation it stores (x_in, n, qkv, q, k, v, y, a, x_mid, m, pre, post, f, out: about a dozen times
// on the residual path) and reads bf16 copies of its weights, so errors of independent roundings add
// in quadrature over an 11-layer stack to ~√(11·12)·2e-3 ≈ 2e-2 on the deepest activations and the
// logits; hence activations and logits ≤ 3e-2, per-token losses ≤ 1e-2 (a loss is dominated by
// lse − z_target, whose bf16 errors partly cancel), mean loss |Δ| ≤ 1e-2 (ln V ≈ 7: 0.15 %).
//
// Gradients: ≤ 5e-2 (the upper end of the bf16 range), or 8 times the "floor" of the same tensor when
// that is larger. The floor is the error of CpuModel<float> run on the weights rounded to bf16 (what
// any bf16 engine multiplies with): it measures how sensitive the tensor is to a single relative
// perturbation of 2⁻⁹. Scalar parameters whose gradient is a sum over all tokens and features with
// heavy cancellation (q_gain, the value-embedding scales, vr_lambda) have floors of 2e-2 to 0.16 on
// the test models, far above the typical tensor's. The GPU perturbs each gradient path by about eight
// such roundings (the stored activations above, each of the weights' size); if their effects added
// linearly the error would be 8 floors, in quadrature about 3.
//
// One rounding is one draw of that sensitivity, and for a cancelling scalar a single draw can land far
// below its typical size: on the tiny s562 model the bigram scale's floor is 5e-3 with the weights
// rounded to nearest but 4e-3 to 6e-2 (rms 3.4e-2) with eight other perturbations of the same size.
// So where a gradient exceeds the bound of its rounded floor, the floor becomes the larger of that and
// the rms over it and kFloorDraws weight perturbations w·(1 + u·2⁻⁹), u uniform in [−1, 1] from fixed
// seeds: the typical sensitivity, not a lucky draw. A well-conditioned tensor keeps its bound of 5e-2.
//
// The GPU's gradients are compared with a CpuModel<double> that rounds the norm-input gradients (d n, d m,
// d h) to bf16 where GpuModel stores them bf16 (CpuModel::set_bf16_norm_grads, the references' autocast
// precision): a rounding the GPU shares with the references is not an error of its kernels. The floors
// stay weights-only (both CPU models without that rounding), so every bound is what it was.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "backend/cuda/gpu_model.h"
#include "core/half.h"
#include "core/rng.h"
#include "model/cpu_model.h"

namespace pgolf::test {

constexpr double kActivationTol = 3e-2;
constexpr double kTokenLossTol = 1e-2;
constexpr double kMeanLossTol = 1e-2;
constexpr double kGradTol = 5e-2;
constexpr double kGradFloorFactor = 8.0;
constexpr int kFloorDraws = 4;

inline double grad_bound(double floor) { return std::max(kGradTol, kGradFloorFactor * floor); }

template <typename A, typename B>
double rel_frobenius(const A& got, const B& ref) {
  double diff = 0, norm = 0;
  size_t n = std::min<size_t>(got.size(), ref.size());
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    if (!std::isfinite(g)) return INFINITY;
    diff += (g - r) * (g - r);
    norm += r * r;
  }
  if (got.size() != ref.size()) return INFINITY;
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

struct ModelRunOptions {
  bool looping = false;
  bool train = true;
  bool qat = false;
  bool bf16_norm_grads = true;  // GpuModelOptions::bf16_norm_grads, and the reference's rounding with it
};

// Runs both models on `params` and `batch` and checks everything; `what` names the case.
inline void expect_gpu_matches_cpu(const std::string& what, const ModelConfig& cfg, const ParamSet<double>& params,
                                   const Batch& batch, const ModelRunOptions& opt = {}) {
  CpuModel<double> ref(cfg);
  ref.params() = params;
  ref.set_looping(opt.looping);
  ref.set_train(opt.train);
  ref.set_qat(opt.qat);
  ref.zero_grad();
  const double ref_loss = ref.forward(batch);
  ref.backward();
  const ParamSet<double> unrounded_grads = ref.grads();  // what the weights-only floors are measured against
  // The GPU's reference: the same forward, the norm-input gradients rounded where GpuModel rounds them.
  ref.set_bf16_norm_grads(opt.bf16_norm_grads);
  ref.zero_grad();
  ref.forward(batch);
  ref.backward();

  // The weights-only floor: fp32 CPU model on bf16-rounded parameters (draw 0), or on parameters
  // perturbed by relative amounts uniform in [−2⁻⁹, 2⁻⁹] (draws 1, 2, ...: seeds 1, 2, ...).
  auto floor_run = [&](int draw, double* loss) {
    CpuModel<float> floor_model(cfg);
    floor_model.params() = params.cast<float>();
    Rng rng(static_cast<uint64_t>(draw));
    for (float& x : floor_model.params().all())
      x = draw == 0 ? round_to_bf16(x) : static_cast<float>(x * (1.0 + rng.uniform(-1.0, 1.0) / 512.0));
    floor_model.set_looping(opt.looping);
    floor_model.set_train(opt.train);
    floor_model.set_qat(opt.qat);
    floor_model.zero_grad();
    const double l = floor_model.forward(batch);
    if (loss) *loss = l;
    floor_model.backward();
    return floor_model.grads();
  };
  double floor_loss = 0;
  const ParamSet<float> floor_grads = floor_run(0, &floor_loss);

  cuda::GpuModelOptions gpu_options{batch.tokens()};
  gpu_options.bf16_norm_grads = opt.bf16_norm_grads;
  cuda::GpuModel gpu(cfg, gpu_options);
  gpu.load_params(params.cast<float>());
  gpu.set_looping(opt.looping);
  gpu.set_train(opt.train);
  gpu.set_qat(opt.qat);
  gpu.zero_grad();
  gpu.set_batch(batch);
  gpu.forward();
  const double gpu_loss = gpu.loss();
  const std::vector<float> gpu_losses = gpu.token_losses();
  const std::vector<float> gpu_logits = gpu.logits();
  const std::vector<float> gpu_x0 = gpu.x0(), gpu_final = gpu.final_norm_output();
  std::vector<std::vector<float>> gpu_layers;
  for (int v = 0; v < gpu.num_virtual_layers(); ++v) {
    gpu_layers.push_back(gpu.layer_output(v, 0));
    if (ref.is_parallel(v)) gpu_layers.push_back(gpu.layer_output(v, 1));
  }
  gpu.backward();
  ParamSet<float> gpu_grads(gpu.layout());
  gpu.store_grads(gpu_grads);

  std::printf("  [%s] loss gpu %.6f cpu64 %.6f (|d| %.2e; bf16-weights fp32 |d| %.2e)\n", what.c_str(), gpu_loss,
              ref_loss, std::fabs(gpu_loss - ref_loss), std::fabs(floor_loss - ref_loss));
  EXPECT_LE(std::fabs(gpu_loss - ref_loss), kMeanLossTol) << what << ": mean loss";
  const double e_losses = rel_frobenius(gpu_losses, ref.token_losses());
  EXPECT_LE(e_losses, kTokenLossTol) << what << ": per-token losses";
  const double e_logits = rel_frobenius(gpu_logits, ref.logits());
  EXPECT_LE(e_logits, kActivationTol) << what << ": logits";
  const double e_x0 = rel_frobenius(gpu_x0, ref.x0());
  EXPECT_LE(e_x0, kActivationTol) << what << ": x0";
  double worst_layer = 0;
  size_t li = 0;
  for (int v = 0; v < ref.num_virtual_layers(); ++v) {
    for (int lane = 0; lane < (ref.is_parallel(v) ? 2 : 1); ++lane) {
      const double e = rel_frobenius(gpu_layers[li++], ref.layer_output(v, lane));
      EXPECT_LE(e, kActivationTol) << what << ": output of virtual layer " << v << " lane " << lane;
      worst_layer = std::max(worst_layer, e);
    }
  }
  const double e_final = rel_frobenius(gpu_final, ref.final_norm_output());
  EXPECT_LE(e_final, kActivationTol) << what << ": final norm";
  std::printf("  [%s] rel errors: token losses %.2e  logits %.2e  x0 %.2e  worst layer %.2e  final norm %.2e\n",
              what.c_str(), e_losses, e_logits, e_x0, worst_layer, e_final);

  const size_t tensors = ref.params().layout().size();
  std::vector<double> errors(tensors), floors(tensors);
  bool over = false;
  for (size_t i = 0; i < tensors; ++i) {
    errors[i] = rel_frobenius(gpu_grads[i], ref.grads()[i]);
    floors[i] = rel_frobenius(floor_grads[i], unrounded_grads[i]);
    over = over || errors[i] > grad_bound(floors[i]);
  }
  if (over) {  // the typical sensitivity: the rms over the rounded draw and kFloorDraws perturbations
    std::vector<double> sum_sq(tensors);
    for (size_t i = 0; i < tensors; ++i) sum_sq[i] = floors[i] * floors[i];
    for (int draw = 1; draw <= kFloorDraws; ++draw) {
      const ParamSet<float> g = floor_run(draw, nullptr);
      for (size_t i = 0; i < tensors; ++i) {
        const double e = rel_frobenius(g[i], unrounded_grads[i]);
        sum_sq[i] += e * e;
      }
    }
    for (size_t i = 0; i < tensors; ++i) floors[i] = std::max(floors[i], std::sqrt(sum_sq[i] / (kFloorDraws + 1)));
  }
  double worst = 0, worst_floor = 0;
  std::string worst_name;
  for (size_t i = 0; i < tensors; ++i) {
    const std::string& name = ref.params().layout().spec(i).name;
    EXPECT_LE(errors[i], grad_bound(floors[i]))
        << what << ": gradient of " << name << " (bf16-weights fp32 floor " << floors[i]
        << (over ? ", the rms of the rounded and the perturbed draws" : "") << ")";
    if (errors[i] > worst) worst = errors[i], worst_name = name;
    worst_floor = std::max(worst_floor, floors[i]);
  }
  std::printf("  [%s] %zu gradient tensors: worst rel error %.2e (%s); bf16-weights floor worst %.2e%s\n",
              what.c_str(), tensors, worst, worst_name.c_str(), worst_floor,
              over ? " (perturbed draws taken)" : "");
}

}  // namespace pgolf::test
