// One thread per head vector (a q head or a k head of one token), staged in shared memory (fp32, rows
// padded by one word so that threads indexing the same element hit different banks) because RoPE pairs
// elements j and j + rope_dims/2 at run-time distances. With 64 threads per block and a grid stride
// that is a multiple of 64, a thread always sees the same q head (H divides 64), so the q-gain
// gradient reduces per thread and then per block in a fixed order.
#include "backend/cuda/check.h"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/qk_norm_rope.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 64;
constexpr int kMaxBlocks = 2048;

struct HeadRow {
  int64_t token;
  int head;
  bool is_q;
};

__device__ __forceinline__ HeadRow head_row(int64_t r, const QkShape& s) {
  const int64_t q_rows = s.tokens * s.heads;
  if (r < q_rows) return {r / s.heads, static_cast<int>(r % s.heads), true};
  const int64_t kr = r - q_rows;
  return {kr / s.kv_heads, static_cast<int>(kr % s.kv_heads), false};
}

// [a, b] ← R(θ)[a, b] or Rᵀ(θ)[a, b] for the rotated pairs of one head vector.
__device__ __forceinline__ void rotate(float* v, const float* cos_row, const float* sin_row, int half, bool transpose) {
  for (int j = 0; j < half; ++j) {
    const float c = cos_row[j], s = transpose ? -sin_row[j] : sin_row[j];
    const float a = v[j], b = v[j + half];
    v[j] = a * c + b * s;
    v[j + half] = a * (-s) + b * c;
  }
}

__global__ void __launch_bounds__(kThreads) qk_forward_kernel(const bf16* __restrict__ q_lin,
                                                              const bf16* __restrict__ k_lin, int64_t in_stride,
                                                              const float* __restrict__ gain,
                                                              const float* __restrict__ rope_cos,
                                                              const float* __restrict__ rope_sin, bf16* __restrict__ q,
                                                              bf16* __restrict__ k, float* __restrict__ q_rstd,
                                                              float* __restrict__ k_rstd, const QkShape s) {
  extern __shared__ float smem[];
  const int Dh = s.head_dim, half = s.rope_dims / 2;
  float* v = smem + threadIdx.x * (Dh + 1);
  const int64_t rows = s.tokens * (s.heads + s.kv_heads);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const HeadRow hr = head_row(r, s);
    const bf16* src = (hr.is_q ? q_lin : k_lin) + hr.token * in_stride + hr.head * Dh;
    float ss = 0.f;
    for (int c = 0; c < Dh; c += 8) {
      float x[8];
      load8(src + c, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[c + e] = x[e];
        ss += x[e] * x[e];
      }
    }
    const float inv = 1.f / sqrtf(ss / static_cast<float>(Dh) + kRmsNormEpsF);
    for (int j = 0; j < Dh; ++j) v[j] *= inv;
    const int64_t pos = hr.token % s.seq_len;
    rotate(v, rope_cos + pos * half, rope_sin + pos * half, half, false);
    const float g = hr.is_q ? gain[hr.head] : 1.f;
    bf16* dst = hr.is_q ? q + (hr.token * s.heads + hr.head) * Dh : k + (hr.token * s.kv_heads + hr.head) * Dh;
    for (int c = 0; c < Dh; c += 8) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = v[c + e] * g;
      store8(dst + c, o);
    }
    if (hr.is_q) q_rstd[hr.token * s.heads + hr.head] = inv;
    else k_rstd[hr.token * s.kv_heads + hr.head] = inv;
  }
}

__global__ void __launch_bounds__(kThreads) qk_backward_kernel(
    const bf16* __restrict__ dq, const bf16* __restrict__ dk, const bf16* __restrict__ q_lin,
    const bf16* __restrict__ k_lin, int64_t in_stride, const float* __restrict__ q_rstd,
    const float* __restrict__ k_rstd, const float* __restrict__ gain, const float* __restrict__ rope_cos,
    const float* __restrict__ rope_sin, bf16* __restrict__ dq_lin, bf16* __restrict__ dk_lin, int64_t out_stride,
    float* __restrict__ partials, const QkShape s) {
  extern __shared__ float smem[];
  const int Dh = s.head_dim, half = s.rope_dims / 2;
  float* x = smem + threadIdx.x * (2 * Dh + 1);
  float* d = x + Dh;
  float gain_acc = 0.f;  // Σ dq⊙q_rope of this thread's q head (threadIdx.x mod H)
  const int64_t rows = s.tokens * (s.heads + s.kv_heads);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const HeadRow hr = head_row(r, s);
    const int64_t vec_index = hr.is_q ? hr.token * s.heads + hr.head : hr.token * s.kv_heads + hr.head;
    const bf16* src = (hr.is_q ? q_lin : k_lin) + hr.token * in_stride + hr.head * Dh;
    const bf16* grad = (hr.is_q ? dq : dk) + vec_index * Dh;
    for (int c = 0; c < Dh; c += 8) {
      float xv[8], dv[8];
      load8(src + c, xv);
      load8(grad + c, dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[c + e] = xv[e], d[c + e] = dv[e];
    }
    const float inv = hr.is_q ? q_rstd[vec_index] : k_rstd[vec_index];
    const int64_t pos = hr.token % s.seq_len;
    const float* cos_row = rope_cos + pos * half;
    const float* sin_row = rope_sin + pos * half;
    if (hr.is_q) {
      // dgain: Σ dq⊙q_rope with q_rope = R·(x·inv), recomputed pair by pair.
      for (int j = 0; j < half; ++j) {
        const float a = x[j] * inv, b = x[j + half] * inv, c = cos_row[j], sn = sin_row[j];
        gain_acc += d[j] * (a * c + b * sn) + d[j + half] * (a * (-sn) + b * c);
      }
      for (int j = 2 * half; j < Dh; ++j) gain_acc += d[j] * (x[j] * inv);
      const float g = gain[hr.head];
      for (int j = 0; j < Dh; ++j) d[j] *= g;
    }
    rotate(d, cos_row, sin_row, half, true);
    float dot = 0.f;
    for (int j = 0; j < Dh; ++j) dot += d[j] * x[j];
    const float c2 = inv * inv * dot / static_cast<float>(Dh);
    bf16* dst = (hr.is_q ? dq_lin : dk_lin) + hr.token * out_stride + hr.head * Dh;
    for (int c = 0; c < Dh; c += 8) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = inv * (d[c + e] - x[c + e] * c2);
      store8(dst + c, o);
    }
  }
  if (!partials) return;
  __syncthreads();
  smem[threadIdx.x] = gain_acc;  // the staging rows are no longer needed
  __syncthreads();
  if (threadIdx.x < s.heads) {
    float sum = 0.f;
    for (int t = threadIdx.x; t < kThreads; t += s.heads) sum += smem[t];
    partials[static_cast<size_t>(blockIdx.x) * s.heads + threadIdx.x] = sum;
  }
}

void check_shape(const QkShape& s, const char* what) {
  PG_CUDA_REQUIRE(s.head_dim > 0 && s.head_dim % 8 == 0 && s.head_dim <= 64, what);
  PG_CUDA_REQUIRE(s.heads > 0 && kThreads % s.heads == 0 && s.kv_heads > 0, what);
  PG_CUDA_REQUIRE(s.rope_dims >= 0 && s.rope_dims % 2 == 0 && s.rope_dims <= s.head_dim && s.seq_len > 0, what);
}

int grid_of(const QkShape& s) {
  return item_blocks(s.tokens * (s.heads + s.kv_heads), kThreads, kMaxBlocks);
}

}  // namespace

size_t qk_norm_rope_workspace_floats(const QkShape& shape) {
  return static_cast<size_t>(grid_of(shape)) * shape.heads;
}

void qk_norm_rope_forward(const bf16* q_lin, const bf16* k_lin, int64_t in_stride, const float* gain,
                          const float* rope_cos, const float* rope_sin, bf16* q, bf16* k, float* q_rstd,
                          float* k_rstd, const QkShape& s, cudaStream_t stream) {
  check_shape(s, "qk_norm_rope_forward: head_dim must be a multiple of 8 up to 64, heads must divide 64, rope_dims "
                 "even and at most head_dim");
  if (s.tokens == 0) return;
  const size_t smem = static_cast<size_t>(kThreads) * (s.head_dim + 1) * sizeof(float);
  qk_forward_kernel<<<grid_of(s), kThreads, smem, stream>>>(q_lin, k_lin, in_stride, gain, rope_cos, rope_sin, q, k,
                                                            q_rstd, k_rstd, s);
  PG_CUDA_LAUNCH_CHECK();
}

void qk_norm_rope_backward(const bf16* dq, const bf16* dk, const bf16* q_lin, const bf16* k_lin, int64_t in_stride,
                           const float* q_rstd, const float* k_rstd, const float* gain, const float* rope_cos,
                           const float* rope_sin, bf16* dq_lin, bf16* dk_lin, int64_t out_stride, float* dgain,
                           const QkShape& s, const ReduceWorkspace& ws, cudaStream_t stream) {
  check_shape(s, "qk_norm_rope_backward: head_dim must be a multiple of 8 up to 64, heads must divide 64, rope_dims "
                 "even and at most head_dim");
  if (s.tokens == 0) return;
  const int blocks = grid_of(s);
  if (dgain) check_reduce_workspace(ws, blocks, s.heads, "qk_norm_rope_backward");
  const size_t smem = static_cast<size_t>(kThreads) * (2 * s.head_dim + 1) * sizeof(float);
  qk_backward_kernel<<<blocks, kThreads, smem, stream>>>(dq, dk, q_lin, k_lin, in_stride, q_rstd, k_rstd, gain,
                                                         rope_cos, rope_sin, dq_lin, dk_lin, out_stride,
                                                         dgain ? ws.data : nullptr, s);
  PG_CUDA_LAUNCH_CHECK();
  if (dgain) finish_partial_sums(ws.data, blocks, {{dgain, s.heads}}, stream);
}

}  // namespace pgolf::cuda
