// One warp per token row; lanes take the row's 8-logit vectors in turn and keep an online
// (max, sum of exp) pair, merged across the warp at the end.
#include <cmath>

#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/softcap_ce.h"

namespace pgolf::cuda {
namespace {

constexpr int kWarps = 8;

__global__ void __launch_bounds__(kWarps * 32) softcap_ce_forward_kernel(const bf16* __restrict__ z,
                                                                         const int32_t* __restrict__ targets,
                                                                         float* __restrict__ losses,
                                                                         float* __restrict__ lse, int64_t N, int V,
                                                                         float cap) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const float inv_cap = 1.f / cap;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < N;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const bf16* zr = z + row * V;
    float m = -INFINITY, s = 0.f;
    for (int f0 = lane * 8; f0 < V; f0 += 256) {
      float v[8];
      load8(zr + f0, v);
      float vmax = -INFINITY;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[e] = cap * tanhf(v[e] * inv_cap);
        vmax = fmaxf(vmax, v[e]);
      }
      const float m_new = fmaxf(m, vmax);
      s *= expf(m - m_new);
#pragma unroll
      for (int e = 0; e < 8; ++e) s += expf(v[e] - m_new);
      m = m_new;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m, offset), s_o = __shfl_xor_sync(0xffffffffu, s, offset);
      const float m_new = fmaxf(m, m_o);
      s = (m == -INFINITY ? 0.f : s * expf(m - m_new)) + (m_o == -INFINITY ? 0.f : s_o * expf(m_o - m_new));
      m = m_new;
    }
    if (lane == 0) {
      const float l = m + logf(s);
      lse[row] = l;
      const float ct = cap * tanhf(__bfloat162float(zr[targets[row]]) * inv_cap);
      losses[row] = l - ct;
    }
  }
}

__global__ void __launch_bounds__(kWarps * 32) softcap_ce_backward_kernel(
    const bf16* z, const float* __restrict__ lse, const int32_t* __restrict__ targets,
    const float* __restrict__ weights, float uniform_weight, bf16* dz, int64_t N, int V, float cap) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const float inv_cap = 1.f / cap;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < N;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float w = weights ? weights[row] : uniform_weight, l = lse[row];
    const int t = targets[row];
    for (int f0 = lane * 8; f0 < V; f0 += 256) {
      float v[8];
      load8(z + row * V + f0, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float th = tanhf(v[e] * inv_cap);
        float g = expf(cap * th - l);
        if (f0 + e == t) g -= 1.f;
        v[e] = w * g * (1.f - th * th);
      }
      store8(dz + row * V + f0, v);
    }
  }
}

__global__ void mean_loss_kernel(const float* __restrict__ losses, int64_t n, float* __restrict__ out) {
  pdl_prologue();
  __shared__ float smem[32];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
  store_scalar_partial(s, smem, out);
  if (threadIdx.x == 0) *out /= static_cast<float>(n);
}

__global__ void scatter_losses_kernel(const float* __restrict__ values, const int32_t* __restrict__ index, int64_t rows,
                                      float* __restrict__ out) {
  pdl_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[index[i]] = values[i];
}

int row_grid(int64_t N) { return item_blocks(N, kWarps, 4 * 132 * 8); }

}  // namespace

void softcap_ce_forward(const bf16* z, const int32_t* targets, float* losses, float* lse, int64_t N, int V, float cap,
                        cudaStream_t stream) {
  PG_CUDA_REQUIRE(V > 0 && V % 8 == 0, "softcap_ce_forward: the vocab must be a positive multiple of 8");
  PG_CUDA_REQUIRE(cap > 0.f, "softcap_ce_forward: the soft cap must be positive");
  if (N == 0) return;
  launch_kernel(softcap_ce_forward_kernel, row_grid(N), kWarps * 32, 0, stream, z, targets, losses, lse, N, V, cap);
  PG_CUDA_LAUNCH_CHECK();
}

void softcap_ce_backward(const bf16* z, const float* lse, const int32_t* targets, const float* weights,
                         float uniform_weight, bf16* dz, int64_t N, int V, float cap, cudaStream_t stream) {
  PG_CUDA_REQUIRE(V > 0 && V % 8 == 0, "softcap_ce_backward: the vocab must be a positive multiple of 8");
  if (N == 0) return;
  launch_kernel(softcap_ce_backward_kernel, row_grid(N), kWarps * 32, 0, stream, z, lse, targets, weights,
                uniform_weight, dz, N, V, cap);
  PG_CUDA_LAUNCH_CHECK();
}

void mean_loss(const float* losses, int64_t n, float* out, cudaStream_t stream) {
  PG_CUDA_REQUIRE(n > 0, "mean_loss: no losses");
  launch_kernel(mean_loss_kernel, 1, 1024, 0, stream, losses, n, out);
  PG_CUDA_LAUNCH_CHECK();
}

void scatter_losses(const float* values, const int32_t* index, int64_t rows, float* out, int64_t n,
                    cudaStream_t stream) {
  PG_CUDA_REQUIRE(rows >= 0 && rows <= n, "scatter_losses: more selected rows than positions");
  PG_CUDA_CHECK(cudaMemsetAsync(out, 0xFF, static_cast<size_t>(n) * sizeof(float), stream));  // all bits set: NaN
  if (rows == 0) return;
  const int threads = 256;
  launch_kernel(scatter_losses_kernel, item_blocks(rows, threads), threads, 0, stream, values, index, rows, out);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
