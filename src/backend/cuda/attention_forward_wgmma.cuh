// The softmax of the Hopper forwards (attention_forward_wgmma.cu, attention_forward_ws.cu) on wgmma's
// fp32 accumulator fragments (wgmma.cuh): a tile of S for one warpgroup's 64 query rows is kHalves
// arrays of 32 floats, s[h][4j + e] = key 64h + 8j + 2t + (e % 2) of row g + 8·(e / 2) of the warp's 16
// (g = lane / 4, t = lane % 4): the layout of an m64n64 accumulator per half, and of an m64n128 one
// split in two.
#pragma once

#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {

constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;

// Sets the scores of keys after the query to -inf. key0: the tile's first key, warp_row0: the warp's
// first query (both segment-local).
template <int kHalves>
__device__ __forceinline__ void mask_causal(float (&s)[kHalves][32], int key0, int warp_row0, int lane) {
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int key = key0 + h * 64 + (i >> 2) * 8 + 2 * (lane & 3) + (i & 1);
      const int row = warp_row0 + (lane >> 2) + ((i >> 1) & 1) * 8;
      if (key > row) s[h][i] = -INFINITY;
    }
  }
}

// Online softmax of one tile: new running max, the running sum rescaled and increased, the scores
// replaced by exp2(scale·log2(e)·s - max). Returns in `correction` the factor O must be multiplied by
// (exp2(old max - new max)). Row r of this thread is element e = 2r, 2r + 1 of every group of four.
template <int kHalves>
__device__ __forceinline__ void online_softmax(float (&s)[kHalves][32], float (&row_max)[2], float (&row_sum)[2],
                                               float (&correction)[2]) {
  constexpr int kPairs = kHalves * 8;  // pairs of a row's scores this thread holds
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // The tile's max of s by a tree (short dependency chains), scaled once: the scale is positive,
    // so max(scale·s) = scale·max(s) with the same rounding.
    float m[8];
#pragma unroll
    for (int jn = 0; jn < 8; ++jn) {
      m[jn] = fmaxf(s[0][4 * jn + 2 * r], s[0][4 * jn + 2 * r + 1]);
#pragma unroll
      for (int h = 1; h < kHalves; ++h) m[jn] = fmaxf(m[jn], fmaxf(s[h][4 * jn + 2 * r], s[h][4 * jn + 2 * r + 1]));
    }
#pragma unroll
    for (int n = 4; n >= 1; n /= 2) {
#pragma unroll
      for (int i = 0; i < n; ++i) m[i] = fmaxf(m[i], m[i + n]);
    }
    float mx = fmaxf(row_max[r], m[0] * kScaleLog2);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    base[r] = mx == -INFINITY ? 0.f : mx;  // a row with no visible key yet stays empty
    correction[r] = exp2_approx(row_max[r] - base[r]);
    row_max[r] = mx;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float part[4] = {0.f, 0.f, 0.f, 0.f};  // four partial sums: short dependency chains
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      float& e0 = s[i / 8][4 * (i % 8) + 2 * r];
      float& e1 = s[i / 8][4 * (i % 8) + 2 * r + 1];
      e0 = exp2_approx(fmaf(e0, kScaleLog2, -base[r]));
      e1 = exp2_approx(fmaf(e1, kScaleLog2, -base[r]));
      part[i % 4] += e0 + e1;
    }
    row_sum[r] = fmaf(row_sum[r], correction[r], (part[0] + part[1]) + (part[2] + part[3]));
  }
}

// P (the exponentiated scores) as the A operand of O += P·V: k-step kk (keys 16kk..16kk+15) is the
// pair of 8-key accumulator groups jn = 2kk, 2kk + 1 (within half kk / 4), rounded to bf16.
template <int kHalves>
__device__ __forceinline__ void pack_p(const float (&s)[kHalves][32], uint32_t (&p_frag)[kHalves * 4][4]) {
#pragma unroll
  for (int kk = 0; kk < kHalves * 4; ++kk) {
    const int h = kk / 4, lo = 8 * (kk % 4);  // group jn = 2 (kk % 4): keys 16kk + 2t, +1 (rows g, g+8)
    const int hi = lo + 4;                     // group jn + 1: keys 16kk + 8 + 2t, +1
    p_frag[kk][0] = pack_bf16(s[h][lo], s[h][lo + 1]);
    p_frag[kk][1] = pack_bf16(s[h][lo + 2], s[h][lo + 3]);
    p_frag[kk][2] = pack_bf16(s[h][hi], s[h][hi + 1]);
    p_frag[kk][3] = pack_bf16(s[h][hi + 2], s[h][hi + 3]);
  }
}

// O += P·V over the tile's kHalves · 4 k-steps of 16 keys, committed as one group. V is the MN-major B
// operand (wgmma.cuh): keys 16kk.. start 2048·kk bytes into the tile at v_base.
template <int kHalves>
__device__ __forceinline__ void issue_pv(float (&o_acc)[32], const uint32_t (&p_frag)[kHalves * 4][4], uint32_t v_base) {
#pragma unroll
  for (int kk = 0; kk < kHalves * 4; ++kk)
    wgmma_m64n64k16_bf16<true, 1>(o_acc, p_frag[kk], mn_major_step_descriptor(v_base, kk));
  wgmma_commit();
}

// After the scores of the key tile starting at key0 have landed: masked (where the tile crosses the
// diagonal) and exponentiated in place (P in fp32); `correction` as in online_softmax.
template <int kHalves>
__device__ __forceinline__ void softmax_scores(float (&s)[kHalves][32], int key0, int warp_row0, int lane,
                                               float (&row_max)[2], float (&row_sum)[2], float (&correction)[2]) {
#pragma unroll
  for (int h = 0; h < kHalves; ++h) wgmma_fence_operands(s[h]);
  if (key0 + kHalves * 64 - 1 > warp_row0) mask_causal(s, key0, warp_row0, lane);
  online_softmax(s, row_max, row_sum, correction);
}

// O / l and LSE = ln(sum exp(scale·s)) = (max + log2(sum)) · ln 2 of the thread's two query rows,
// warp_row0 + lane / 4 and 8 rows further (segment-local, o_acc in the wgmma accumulator layout of
// attention_forward_wgmma.cu); rows outside [row_begin, row_end) are left unwritten.
__device__ __forceinline__ void store_forward_rows(const AttentionForwardParams& p, const float (&o_acc)[32],
                                                   const float (&row_sum)[2], const float (&row_max)[2],
                                                   int64_t seg_start, int head, int warp_row0, int row_begin,
                                                   int row_end, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = warp_row0 + (lane >> 2) + r * 8;
    if (row < row_begin || row >= row_end) continue;
    const float inv = 1.f / sum;
    const int64_t token = seg_start + row;
    __nv_bfloat16* dst = p.o + token * p.q_row_stride + head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int jn = 0; jn < 8; ++jn)
      *reinterpret_cast<uint32_t*>(dst + jn * 8) =
          pack_bf16(o_acc[4 * jn + 2 * r] * inv, o_acc[4 * jn + 2 * r + 1] * inv);
    if ((lane & 3) == 0)
      p.lse[static_cast<int64_t>(head) * p.total_tokens + token] = (row_max[r] + log2f(sum)) / kLog2e;
  }
}

}  // namespace pgolf::cuda::attention_detail
