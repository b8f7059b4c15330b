// The MLP activation's element math, shared by the separate passes (activation.cu) and the GEMM
// epilogues that fuse it (mlp_gemm.cu), so that both round and compute identically.
#pragma once

namespace pgolf::cuda {

// post = leaky(x)², leaky(x) = x for x > 0 and slope·x otherwise.
__device__ __forceinline__ float leaky_relu_sq_value(float x, float slope) {
  const float a = fmaxf(x, 0.f) + slope * fminf(x, 0.f);
  return a * a;
}

// dpre = dpost · f'(pre), f'(x) = 2x (x > 0) or 2·slope²·x; `slope_sq` = slope².
__device__ __forceinline__ float leaky_relu_sq_gradient(float dpost, float pre, float slope_sq) {
  return dpost * (2.f * (fmaxf(pre, 0.f) + slope_sq * fminf(pre, 0.f)));
}

}  // namespace pgolf::cuda
