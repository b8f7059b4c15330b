// Device helpers for the per-head QK-norm and RoPE of qk_norm_rope.cu. The QKV product whose epilogue
// applies them (mlp_gemm.cu) holds a head in another lane layout but calls the same element math
// (`rotated`, `qk_inv_rms_of_sum`), so that both compute the same fp32 operations: the same bits. In
// qk_norm_rope.cu a head vector of up to 64 values is held by a group of kQkGroupLanes = 8 aligned lanes
// of a warp, lane t of the group holding elements [8t, 8t + 8).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {

constexpr int kQkGroupLanes = 8;

// Sum over the 8 lanes of a group (aligned groups of a warp; every lane of the warp calls it).
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kQkGroupLanes / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// [a, b] ← [a·c + b·s, a·(−s) + b·c] for a = element j < half and b = its partner j + half: `own` is
// a (first) or b, `partner` the other.
__device__ __forceinline__ float rotated(float own, float partner, float c, float sn, bool first) {
  return first ? own * c + partner * sn : partner * (-sn) + own * c;
}

// The same rotation for half a multiple of 8: element j0 + e pairs with element e of the lane
// half/8 further (j0 < half) or back (half ≤ j0 < 2·half); cos/sin come as two 16-byte loads each.
__device__ __forceinline__ void rotate_shuffle(float (&v)[8], int j0, const float* cos_row, const float* sin_row,
                                               int half, bool transpose) {
  const int lane = threadIdx.x & 31;
  const bool rotates = j0 < 2 * half, first = j0 < half;
  const int partner_lane = !rotates ? lane : first ? lane + half / 8 : lane - half / 8;
  float partner[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) partner[e] = __shfl_sync(0xffffffffu, v[e], partner_lane);
  if (!rotates) return;
  const int pair0 = first ? j0 : j0 - half;
  float c[8], sn[8];
  load8(cos_row + pair0, c);
  load8(sin_row + pair0, sn);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = rotated(v[e], partner[e], c[e], transpose ? -sn[e] : sn[e], first);
}

// The saved rstd of a head vector whose squares sum to `sum`: 1/sqrt(sum/head_dim + eps).
__device__ __forceinline__ float qk_inv_rms_of_sum(float sum, int head_dim) {
  return 1.f / sqrtf(sum / static_cast<float>(head_dim) + kRmsNormEpsF);
}

// The head vector's RMSNorm (over `head_dim` values; lanes past it hold zeros): the sum of squares'
// inverse root inv = 1/sqrt(mean(v²) + eps), the saved rstd, the same on every lane of the group.
__device__ __forceinline__ float qk_inv_rms(const float (&v)[8], int head_dim) {
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) ss += v[e] * v[e];
  return qk_inv_rms_of_sum(group_sum(ss), head_dim);
}

// v ← v·inv, inv returned. Every lane of the warp calls it.
__device__ __forceinline__ float qk_normalize(float (&v)[8], int head_dim) {
  const float inv = qk_inv_rms(v, head_dim);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] *= inv;
  return inv;
}

}  // namespace pgolf::cuda
