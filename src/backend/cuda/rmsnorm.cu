#include <type_traits>

#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/rmsnorm.h"

namespace pgolf::cuda {
namespace {

// u = x, or 0.5·(x + x2), for the lane's vectors of one row.
template <int kVec>
__device__ __forceinline__ void load_input(const bf16* x, const bf16* x2, int64_t row, int dim, int lane,
                                           float (&u)[kVec][8]) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int f0 = (lane + 32 * k) * 8;
    if (f0 >= dim) continue;
    load8(x + row * dim + f0, u[k]);
    if (x2) {
      float b[8];
      load8(x2 + row * dim + f0, b);
#pragma unroll
      for (int e = 0; e < 8; ++e) u[k][e] = 0.5f * (u[k][e] + b[e]);
    }
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_forward_kernel(const bf16* __restrict__ x,
                                                                      const bf16* __restrict__ x2,
                                                                      bf16* __restrict__ y, float* __restrict__ rstd,
                                                                      int64_t rows, int dim, float scale) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    float u[kVec][8];
    load_input<kVec>(x, x2, r, dim, lane, u);
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if ((lane + 32 * k) * 8 < dim)
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += u[k][e] * u[k][e];
    ss = warp_sum(ss);
    const float inv = 1.f / sqrtf(ss / static_cast<float>(dim) + kRmsNormEpsF);
    if (lane == 0) rstd[r] = inv;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int f0 = (lane + 32 * k) * 8;
      if (f0 >= dim) continue;
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = (u[k][e] * inv) * scale;
      store8(y + r * dim + f0, o);
    }
  }
}

template <int kVec, typename DyT>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_backward_kernel(const DyT* __restrict__ dy,
                                                                       const bf16* __restrict__ x,
                                                                       const bf16* __restrict__ x2,
                                                                       const float* __restrict__ rstd,
                                                                       float* __restrict__ dx, int64_t rows, int dim,
                                                                       float scale, float out_scale, bool accumulate) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    float u[kVec][8], g[kVec][8];
    load_input<kVec>(x, x2, r, dim, lane, u);
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int f0 = (lane + 32 * k) * 8;
      if (f0 >= dim) continue;
      load8(dy + r * dim + f0, g[k]);
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += g[k][e] * u[k][e];
    }
    dot = warp_sum(dot);
    const float inv = rstd[r];
    const float c = inv * inv * dot / static_cast<float>(dim);
    const float coef = out_scale * scale * inv;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int f0 = (lane + 32 * k) * 8;
      if (f0 >= dim) continue;
      float o[8];
      if (accumulate) load8(dx + r * dim + f0, o);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = (accumulate ? o[e] : 0.f) + coef * (g[k][e] - u[k][e] * c);
      store8(dx + r * dim + f0, o);
    }
  }
}

}  // namespace

void rmsnorm_forward(const bf16* x, const bf16* x2, bf16* y, float* rstd, int64_t rows, int dim, float scale,
                     cudaStream_t stream) {
  check_row_dim(dim, "rmsnorm_forward");
  if (rows == 0) return;
  dispatch_row_vec(dim, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    launch_kernel(rmsnorm_forward_kernel<kVec>, row_blocks(rows), kRowThreads, 0, stream, x, x2, y, rstd, rows, dim,
                  scale);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void rmsnorm_backward(NormGrad dy, const bf16* x, const bf16* x2, const float* rstd, float* dx, int64_t rows,
                      int dim, float scale, float out_scale, bool accumulate, cudaStream_t stream) {
  check_row_dim(dim, "rmsnorm_backward");
  if (rows == 0) return;
  dispatch_row_vec(dim, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    dispatch_norm_grad(dy, [&](auto dy_rows) {
      using DyT = std::remove_cv_t<std::remove_pointer_t<decltype(dy_rows)>>;
      launch_kernel(rmsnorm_backward_kernel<kVec, DyT>, row_blocks(rows), kRowThreads, 0, stream, dy_rows, x, x2, rstd,
                    dx, rows, dim, scale, out_scale, accumulate);
    });
  });
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
