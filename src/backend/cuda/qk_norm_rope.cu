// A group of kLanesPerVec = 8 lanes per head vector (a q head or a k head of one token): lane t of the
// group holds elements [8t, 8t + 8) in registers, read and written with one 16-byte access, so a warp
// moves four whole head vectors (512 contiguous bytes for neighbouring heads) per access. Norms and dot
// products are shuffle sums within the group. RoPE pairs elements j and j + rope_dims/2: when
// rope_dims/2 is a multiple of 8 (the stacks' 16 and 64) the partner sits at the same register index
// of the lane rope_dims/16 away and comes by shuffle; otherwise (any even rope_dims) it may sit at
// another register index, and the rotation exchanges values through a small per-warp shared-memory row
// (9 words per lane: conflict-free stores).
//
// Rows are token-major: row r = token · n + slot with n = H + Hkv, slots < H the q heads and the rest
// the k heads, so the warps of a block read a token's q and k columns of qkv (contiguous) together
// rather than every q column first and the k columns in a second sweep. Blocks hold the largest
// multiple of lcm(n, 4) ≤ 64 groups (whole warps, whole tokens) and the grid stride is a multiple of
// it: a group always sees the same slot, so the q-gain gradient reduces per group and then per block
// in a fixed order. (On the H100 the token-major order took the s691 forward from 177 to 139 µs and the
// backward from 254 to 223 µs; loading two or four grid-stride rows before computing them, at the cost
// of resident warps, was slower.)
#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/qk_norm_rope.h"
#include "backend/cuda/qk_rope.cuh"

#include <numeric>

namespace pgolf::cuda {
namespace {

constexpr int kLanesPerVec = kQkGroupLanes;                 // 8 lanes × 8 elements ≥ head_dim
constexpr int kMaxVecsPerBlock = 64;                        // head vectors in flight per block
constexpr int kThreads = kMaxVecsPerBlock * kLanesPerVec;  // 512 at most
constexpr int kWarps = kThreads / 32;
constexpr int kVecsPerWarp = 32 / kLanesPerVec;
constexpr int kExchangeStride = 9;  // words per lane in the exchange row
constexpr int kMaxBlocks = 2048;
// Resident blocks per multiprocessor the register budget is set for (ptxas -v, sm_90a, no spills):
// the forward fits 40 registers (3 blocks, 48 warps); the backward holds x and dq/dk, 64 registers.
constexpr int kForwardBlocksPerSm = 3;
constexpr int kBackwardBlocksPerSm = 2;

struct HeadRow {
  int token;
  int head;
  bool is_q;
  int vec_index;  // token · heads + head (q) or token · kv_heads + head (k)
};

// Row r < 2³¹ (check_shape): 32-bit divisions, a few instructions where 64-bit ones call a routine.
__device__ __forceinline__ HeadRow head_row(int r, const QkShape& s) {
  const int per_token = s.heads + s.kv_heads, token = r / per_token, slot = r % per_token;
  if (slot < s.heads) return {token, slot, true, token * s.heads + slot};
  return {token, slot - s.heads, false, token * s.kv_heads + slot - s.heads};
}

// The lane's 8 elements (first element j0 = 8·(lane mod 8)) ← R(θ)·v or Rᵀ(θ)·v on the rotated pairs
// (j, j + half), j < half; the other elements keep their value. `row` is the warp's exchange area
// (32 · kExchangeStride floats); the whole warp calls it.
__device__ __forceinline__ void rotate_exchange(float (&v)[8], float* row, int j0, const float* cos_row,
                                                const float* sin_row, int half, bool transpose) {
  const int lane = threadIdx.x & 31;
  float* group = row + (lane & ~(kLanesPerVec - 1)) * kExchangeStride;
#pragma unroll
  for (int e = 0; e < 8; ++e) row[lane * kExchangeStride + e] = v[e];
  __syncwarp();
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int j = j0 + e;
    if (j >= 2 * half) continue;
    const int pair = j < half ? j : j - half;
    const int p = j < half ? j + half : j - half;
    const float partner = group[(p >> 3) * kExchangeStride + (p & 7)];
    v[e] = rotated(v[e], partner, cos_row[pair], transpose ? -sin_row[pair] : sin_row[pair], j < half);
  }
  __syncwarp();  // the row is rewritten by the next call
}

__device__ __forceinline__ void rotate(float (&v)[8], float* row, int j0, const float* cos_row, const float* sin_row,
                                       int half, bool transpose) {
  if (half % 8 == 0) rotate_shuffle(v, j0, cos_row, sin_row, half, transpose);
  else rotate_exchange(v, row, j0, cos_row, sin_row, half, transpose);
}

__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSm)
    qk_forward_kernel(const bf16* __restrict__ q_lin, const bf16* __restrict__ k_lin, int64_t in_stride,
                      const float* __restrict__ gain, const float* __restrict__ rope_cos,
                      const float* __restrict__ rope_sin, bf16* __restrict__ q, bf16* __restrict__ k,
                      float* __restrict__ q_rstd, float* __restrict__ k_rstd, const QkShape s) {
  pdl_prologue();
  __shared__ float exchange[kWarps][32 * kExchangeStride];
  const int Dh = s.head_dim, half = s.rope_dims / 2;
  const int lane = threadIdx.x & 31, sub = lane % kLanesPerVec, j0 = sub * 8;
  const bool owns = j0 < Dh;  // lanes past head_dim hold zeros
  const int64_t rows = s.tokens * (s.heads + s.kv_heads);
  const int vecs_per_block = blockDim.x / kLanesPerVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * vecs_per_block;
  const int64_t first_of_warp = static_cast<int64_t>(blockIdx.x) * vecs_per_block + (threadIdx.x >> 5) * kVecsPerWarp;
  // The loop runs while any group of the warp has a row (uniform per warp: the shuffles need all lanes).
  for (int64_t w = first_of_warp; w < rows; w += stride) {
    const int64_t r = w + lane / kLanesPerVec;
    const bool active = r < rows && owns;
    const HeadRow hr = head_row(r < rows ? static_cast<int>(r) : 0, s);
    const int pos = hr.token % static_cast<int>(s.seq_len);
    float v[8] = {};
    if (active) load8((hr.is_q ? q_lin : k_lin) + hr.token * in_stride + hr.head * Dh + j0, v);
    const float inv = qk_normalize(v, Dh);
    rotate(v, exchange[threadIdx.x >> 5], j0, rope_cos + pos * half, rope_sin + pos * half, half, false);
    if (!active) continue;
    const float g = hr.is_q ? gain[hr.head] : 1.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] *= g;
    store8((hr.is_q ? q : k) + static_cast<int64_t>(hr.vec_index) * Dh + j0, v);
    if (sub == 0) (hr.is_q ? q_rstd : k_rstd)[hr.vec_index] = inv;
  }
}

// dq's 8 elements at p: bf16 as stored, or bf16(scale · sum) as attention_backward's finish pass
// rounds it (the same multiply and round to nearest even, so the same bits).
__device__ __forceinline__ void load_dq(const bf16* p, float, float (&v)[8]) { load8(p, v); }
__device__ __forceinline__ void load_dq(const float* p, float scale, float (&v)[8]) {
  load8(p, v);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = __bfloat162float(__float2bfloat16_rn(scale * v[e]));
}

// Per head vector, with x = the stored input, d = its output gradient, R the rotation, g the gain
// (1 for k): q_rope = R·(x·inv); dgain += Σ d⊙q_rope = inv·Σ (Rᵀd)⊙x; the norm's input gradient
// from dr = g·Rᵀd is inv·(dr − x·inv²·(dr·x)/Dh), with dr·x = g·Σ (Rᵀd)⊙x.
template <typename DqT>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSm)
    qk_backward_kernel(const DqT* __restrict__ dq, float dq_scale, const bf16* __restrict__ dk,
                       const bf16* __restrict__ q_lin,
                       const bf16* __restrict__ k_lin, int64_t in_stride, const float* __restrict__ q_rstd,
                       const float* __restrict__ k_rstd, const float* __restrict__ gain,
                       const float* __restrict__ rope_cos, const float* __restrict__ rope_sin,
                       bf16* __restrict__ dq_lin, bf16* __restrict__ dk_lin, int64_t out_stride,
                       float* __restrict__ partials, const QkShape s) {
  pdl_prologue();
  __shared__ float exchange[kWarps][32 * kExchangeStride];
  const int Dh = s.head_dim, half = s.rope_dims / 2;
  const int lane = threadIdx.x & 31, sub = lane % kLanesPerVec, j0 = sub * 8;
  const bool owns = j0 < Dh;
  float gain_acc = 0.f;  // Σ dq⊙q_rope of this group's slot (its group index mod H + Hkv) if a q head
  const int64_t rows = s.tokens * (s.heads + s.kv_heads);
  const int vecs_per_block = blockDim.x / kLanesPerVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * vecs_per_block;
  const int64_t first_of_warp = static_cast<int64_t>(blockIdx.x) * vecs_per_block + (threadIdx.x >> 5) * kVecsPerWarp;
  for (int64_t w = first_of_warp; w < rows; w += stride) {
    const int64_t r = w + lane / kLanesPerVec;
    const HeadRow hr = head_row(r < rows ? static_cast<int>(r) : 0, s);
    const int pos = hr.token % static_cast<int>(s.seq_len);
    float x[8] = {}, d[8] = {}, inv = 0.f;
    if (r < rows) inv = hr.is_q ? q_rstd[hr.vec_index] : k_rstd[hr.vec_index];
    if (r < rows && owns) {
      load8((hr.is_q ? q_lin : k_lin) + hr.token * in_stride + hr.head * Dh + j0, x);
      if (hr.is_q) load_dq(dq + static_cast<int64_t>(hr.vec_index) * Dh + j0, dq_scale, d);
      else load8(dk + static_cast<int64_t>(hr.vec_index) * Dh + j0, d);
    }
    rotate(d, exchange[threadIdx.x >> 5], j0, rope_cos + pos * half, rope_sin + pos * half, half, true);
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) dot += d[e] * x[e];
    dot = group_sum(dot);  // Σ (Rᵀd)⊙x
    if (r >= rows) continue;
    const float g = hr.is_q ? gain[hr.head] : 1.f;
    if (hr.is_q && sub == 0) gain_acc += inv * dot;
    if (!owns) continue;
    const float c2 = inv * inv * (g * dot) / static_cast<float>(Dh);
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = inv * (g * d[e] - x[e] * c2);
    store8((hr.is_q ? dq_lin : dk_lin) + hr.token * out_stride + hr.head * Dh + j0, o);
  }
  if (!partials) return;
  __shared__ float group_gain[kMaxVecsPerBlock];
  if (sub == 0) group_gain[threadIdx.x / kLanesPerVec] = gain_acc;
  __syncthreads();
  if (threadIdx.x < s.heads) {
    float sum = 0.f;
    for (int t = threadIdx.x; t < vecs_per_block; t += s.heads + s.kv_heads) sum += group_gain[t];
    partials[static_cast<size_t>(blockIdx.x) * s.heads + threadIdx.x] = sum;
  }
}

// Groups per block: the largest multiple of lcm(H + Hkv, 4) up to kMaxVecsPerBlock (0 if none).
int vecs_per_block(const QkShape& s) {
  const int per_token = s.heads + s.kv_heads, unit = std::lcm(per_token, kVecsPerWarp);
  return kMaxVecsPerBlock / unit * unit;
}

void check_shape(const QkShape& s, const char* what) {
  PG_CUDA_REQUIRE(s.head_dim > 0 && s.head_dim % 8 == 0 && s.head_dim <= kLanesPerVec * 8, what);
  PG_CUDA_REQUIRE(s.heads > 0 && s.kv_heads > 0 && vecs_per_block(s) > 0, what);
  PG_CUDA_REQUIRE(s.rope_dims >= 0 && s.rope_dims % 2 == 0 && s.rope_dims <= s.head_dim && s.seq_len > 0, what);
  PG_CUDA_REQUIRE(s.tokens * (s.heads + s.kv_heads) < (int64_t{1} << 31), what);
}

int grid_of(const QkShape& s) {
  return item_blocks(s.tokens * (s.heads + s.kv_heads), vecs_per_block(s), kMaxBlocks);
}

}  // namespace

size_t qk_norm_rope_workspace_floats(const QkShape& shape) { return static_cast<size_t>(grid_of(shape)) * shape.heads; }

void qk_norm_rope_forward(const bf16* q_lin, const bf16* k_lin, int64_t in_stride, const float* gain,
                          const float* rope_cos, const float* rope_sin, bf16* q, bf16* k, float* q_rstd, float* k_rstd,
                          const QkShape& s, cudaStream_t stream) {
  check_shape(s,
              "qk_norm_rope_forward: head_dim must be a multiple of 8 up to 64, lcm(heads + kv_heads, 4) at most 64, rope_dims "
              "even and at most head_dim, fewer than 2^31 head vectors");
  if (s.tokens == 0) return;
  launch_kernel(qk_forward_kernel, grid_of(s), vecs_per_block(s) * kLanesPerVec, 0, stream, q_lin, k_lin, in_stride,
                gain, rope_cos, rope_sin, q, k, q_rstd, k_rstd, s);
  PG_CUDA_LAUNCH_CHECK();
}

void qk_norm_rope_backward(const QkDq& dq, const bf16* dk, const bf16* q_lin, const bf16* k_lin, int64_t in_stride,
                           const float* q_rstd, const float* k_rstd, const float* gain, const float* rope_cos,
                           const float* rope_sin, bf16* dq_lin, bf16* dk_lin, int64_t out_stride, float* dgain,
                           const QkShape& s, const ReduceWorkspace& ws, cudaStream_t stream) {
  check_shape(s,
              "qk_norm_rope_backward: head_dim must be a multiple of 8 up to 64, lcm(heads + kv_heads, 4) at most 64, rope_dims "
              "even and at most head_dim, fewer than 2^31 head vectors");
  if (s.tokens == 0) return;
  const int blocks = grid_of(s);
  if (dgain) check_reduce_workspace(ws, blocks, s.heads, "qk_norm_rope_backward");
  PG_CUDA_REQUIRE((dq.rounded != nullptr) != (dq.sum.sum != nullptr),
                  "qk_norm_rope_backward: dq must be given either as bf16 or as attention's fp32 sum");
  float* partials = dgain ? ws.data : nullptr;
  if (dq.rounded)
    launch_kernel(qk_backward_kernel<bf16>, blocks, vecs_per_block(s) * kLanesPerVec, 0, stream, dq.rounded, 1.f, dk,
                  q_lin, k_lin, in_stride, q_rstd, k_rstd, gain, rope_cos, rope_sin, dq_lin, dk_lin, out_stride,
                  partials, s);
  else
    launch_kernel(qk_backward_kernel<float>, blocks, vecs_per_block(s) * kLanesPerVec, 0, stream, dq.sum.sum,
                  dq.sum.scale, dk, q_lin, k_lin, in_stride, q_rstd, k_rstd, gain, rope_cos, rope_sin, dq_lin, dk_lin,
                  out_stride, partials, s);
  PG_CUDA_LAUNCH_CHECK();
  if (dgain) finish_partial_sums(ws.data, blocks, {{dgain, s.heads}}, stream);
}

}  // namespace pgolf::cuda
