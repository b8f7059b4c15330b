#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/smear.h"

namespace pgolf::cuda {
namespace {

template <int kVec>
__device__ __forceinline__ void lane_sigmoid(const float* gate, int dim, int lane, float (&g)[kVec][8]) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int f0 = (lane + 32 * k) * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) g[k][e] = f0 < dim ? sigmoidf_(gate[f0 + e]) : 0.f;
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) smear_forward_kernel(const bf16* __restrict__ x,
                                                                    const float* __restrict__ gate,
                                                                    bf16* __restrict__ y, int64_t tokens,
                                                                    int64_t seq_len, int dim) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  float g[kVec][8];
  lane_sigmoid<kVec>(gate, dim, lane, g);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); i < tokens;
       i += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const bool first = i % seq_len == 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int f0 = (lane + 32 * k) * 8;
      if (f0 >= dim) continue;
      float cur[8], prev[8] = {}, out[8];
      load8(x + i * dim + f0, cur);
      if (!first) load8(x + (i - 1) * dim + f0, prev);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = (1.f - g[k][e]) * cur[e] + g[k][e] * prev[e];
      store8(y + i * dim + f0, out);
    }
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) smear_backward_kernel(const float* __restrict__ dy,
                                                                     const bf16* __restrict__ x,
                                                                     const float* __restrict__ gate,
                                                                     float* __restrict__ dx,
                                                                     float* __restrict__ partials, int64_t tokens,
                                                                     int64_t seq_len, int dim, bool accumulate) {
  pdl_prologue();
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  float g[kVec][8], acc[kVec][8] = {};
  lane_sigmoid<kVec>(gate, dim, lane, g);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); i < tokens;
       i += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const bool first = i % seq_len == 0, last = (i + 1) % seq_len == 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int f0 = (lane + 32 * k) * 8;
      if (f0 >= dim) continue;
      float d[8], next[8] = {}, o[8] = {};
      load8(dy + i * dim + f0, d);
      if (!last) load8(dy + (i + 1) * dim + f0, next);
      if (accumulate) load8(dx + i * dim + f0, o);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += (1.f - g[k][e]) * d[e] + g[k][e] * next[e];
      store8(dx + i * dim + f0, o);
      if (partials) {
        float cur[8], prev[8] = {};
        load8(x + i * dim + f0, cur);
        if (!first) load8(x + (i - 1) * dim + f0, prev);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k][e] += d[e] * (prev[e] - cur[e]);
      }
    }
  }
  if (!partials) return;
#pragma unroll
  for (int k = 0; k < kVec; ++k)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[k][e] *= g[k][e] * (1.f - g[k][e]);
  store_column_partials<kVec>(acc, smem, partials + static_cast<size_t>(blockIdx.x) * dim, dim);
}

}  // namespace

void smear_forward(const bf16* x, const float* gate, bf16* y, int64_t rows, int64_t seq_len, int dim,
                   cudaStream_t stream) {
  check_row_dim(dim, "smear_forward");
  const int64_t tokens = rows * seq_len;
  if (tokens == 0) return;
  dispatch_row_vec(dim, [&](auto vec) {
    launch_kernel(smear_forward_kernel<decltype(vec)::value>, row_blocks(tokens), kRowThreads, 0, stream, x, gate, y,
                  tokens, seq_len, dim);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void smear_backward(const float* dy, const bf16* x, const float* gate, float* dx, float* dgate, int64_t rows,
                    int64_t seq_len, int dim, const ReduceWorkspace& ws, cudaStream_t stream, bool accumulate) {
  check_row_dim(dim, "smear_backward");
  const int64_t tokens = rows * seq_len;
  if (tokens == 0) return;
  const int blocks = row_blocks(tokens);
  if (dgate) check_reduce_workspace(ws, blocks, dim, "smear_backward");
  float* partials = dgate ? ws.data : nullptr;
  dispatch_row_vec(dim, [&](auto vec) {
    launch_kernel(smear_backward_kernel<decltype(vec)::value>, blocks, kRowThreads,
                  static_cast<size_t>(kRowWarps) * dim * sizeof(float), stream, dy, x, gate, dx, partials, tokens,
                  seq_len, dim, accumulate);
  });
  PG_CUDA_LAUNCH_CHECK();
  if (dgate) finish_partial_sums(ws.data, blocks, {{dgate, dim}}, stream);
}

}  // namespace pgolf::cuda
