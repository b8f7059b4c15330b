// Per-element update rules of the optimizers and averages, written once for the CPU and the CUDA
// engine: every function is `PG_HD` (host + device under nvcc, plain inline otherwise) and this
// header includes nothing but <math.h>, so a .cu file can include it (no fmt, no exceptions).
//
// Each rule reproduces the arithmetic of the PyTorch code the references run (operation order,
// where it rounds), so that the CPU step matches the golden step to the last bits or within an ulp.
#pragma once

#include <math.h>

#ifndef PG_HD
#if defined(__CUDACC__)
#define PG_HD __host__ __device__ __forceinline__
#else
#define PG_HD inline
#endif
#endif

namespace pgolf::optim {

// A product rounded on its own before it is added to something. nvcc contracts `a * b + c` into one
// fused multiply-add in device code (the host build does not), which would round once where the
// rules below round twice; the rounding intrinsics are never contracted, so the CUDA engine computes
// the same bits as the CPU.
PG_HD float mul_rounded(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PG_HD double mul_rounded(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Identity rounding for the fp32 paths; the bf16 paths pass a bf16 round-to-nearest-even instead
// (core/half.h's round_to_bf16 on the CPU, __float2bfloat16_rn in CUDA).
struct KeepF32 {
  PG_HD float operator()(float x) const { return x; }
};

// ---- AdamW (torch.optim.AdamW(fused=True)) ---------------------------------------------------------
// Hyperparameters rounded to fp32, moments accumulated in double and stored as float, the decay as
// one fused multiply-add and the step in fp32. This is the model of the fused kernel that fits the
// golden step best: 97-98 % of the AdamW-updated values bit for bit, the rest within 1 ulp (the
// kernel's source read literally, double betas and lr, matches 80-89 %).
struct AdamCoeffs {
  float lr = 0.0f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float weight_decay = 0.0f;
  float eps = 1e-8f;
  float bias_correction1 = 1.0f;       // 1 - beta1^t
  float bias_correction2_sqrt = 1.0f;  // sqrt(1 - beta2^t)
};

// Coefficients of the t-th step (t counts from 1).
inline AdamCoeffs adam_coeffs(double lr, double beta1, double beta2, double weight_decay, double eps, long long t) {
  AdamCoeffs c{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
               static_cast<float>(weight_decay), static_cast<float>(eps), 1.0f, 1.0f};
  c.bias_correction1 = static_cast<float>(1.0 - pow(static_cast<double>(c.beta1), static_cast<double>(t)));
  c.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(static_cast<double>(c.beta2), static_cast<double>(t))));
  return c;
}

// p ← p − lr·wd·p (decoupled decay), then the bias-corrected Adam update.
PG_HD void adamw_update(float& p, float g, float& exp_avg, float& exp_avg_sq, const AdamCoeffs& c) {
  if (c.weight_decay != 0.0f) p = fmaf(-(c.lr * c.weight_decay), p, p);
  const double beta1 = c.beta1, beta2 = c.beta2;
  exp_avg = static_cast<float>(mul_rounded(beta1, static_cast<double>(exp_avg)) +
                               mul_rounded(1.0 - beta1, static_cast<double>(g)));
  exp_avg_sq = static_cast<float>(mul_rounded(beta2, static_cast<double>(exp_avg_sq)) +
                                  mul_rounded((1.0 - beta2) * g, static_cast<double>(g)));
  const float step_size = c.lr / c.bias_correction1;
  const float denom = sqrtf(exp_avg_sq) / c.bias_correction2_sqrt + c.eps;
  p -= step_size * exp_avg / denom;
}

// ---- Muon -----------------------------------------------------------------------------------------
// Momentum with Nesterov look-ahead: `buf.mul_(mu).add_(g)` then `g.add(buf, alpha=mu)`. `round`
// is applied after every tensor op (identity when the buffer is fp32, bf16 in the banked
// Parallel-Muon path whose gradient and buffer are bf16). Returns the update u = g + mu·buf.
template <typename Round>
PG_HD float muon_nesterov(float g, float& buf, float mu, Round round) {
  buf = round(round(mul_rounded(buf, mu)) + g);
  return round(g + mul_rounded(mu, buf));
}

// Decoupled weight decay then the step: `p.mul_(decay)` then `p.add_(u, alpha=alpha)` with
// decay = 1 − lr·wd and alpha = −lr (per-matrix Muon) or −lr·shape_scale (banked Muon); the add is
// one fused multiply-add, as nvcc compiles PyTorch's `a + alpha*b` kernel.
PG_HD float decayed_step(float p, float u, float decay, float alpha) {
  const float decayed = p * decay;
  return fmaf(alpha, u, decayed);
}

// ---- Averages -------------------------------------------------------------------------------------
// EMA: `ema.mul_(d).add_(θ, alpha=1−d)` (the add fused as in decayed_step).
PG_HD float ema_update(float ema, float theta, float decay, float one_minus_decay) {
  const float scaled = ema * decay;
  return fmaf(one_minus_decay, theta, scaled);
}

// ---- Gradient clipping ----------------------------------------------------------------------------
// clip_grad_norm_'s coefficient min(1, max_norm / (norm + 1e-6)) in fp32, as PyTorch computes it
// (the fp32 norm plus 1e-6, its reciprocal, times max_norm, clamped at 1).
PG_HD float clip_coefficient_f32(float total_norm, float max_norm) {
  const float denom = total_norm + 1e-6f;
  const float coef = (1.0f / denom) * max_norm;
  return coef > 1.0f ? 1.0f : coef;  // a NaN norm gives a NaN coefficient, as std::min would
}

// ---- Late-QAT fake quantization (SPEC §4.7) ---------------------------------------------------------
// Q(w) = clamp(round_half_even(w / s), qmin, qmax) · s in fp32, s = the row's scale.
PG_HD float fake_quant_value(float w, float scale, float qmin, float qmax) {
  float q = rintf(w / scale);  // the default rounding mode is round-half-to-even, as torch.round
  q = q < qmin ? qmin : (q > qmax ? qmax : q);
  return q * scale;
}

}  // namespace pgolf::optim
