#include "backend/cuda/activation.h"
#include "backend/cuda/activation.cuh"
#include "backend/cuda/check.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

__global__ void leaky_relu_sq_forward_kernel(const bf16* __restrict__ pre, bf16* __restrict__ post, int64_t vecs,
                                             float slope) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < vecs;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[8];
    load8(pre + t * 8, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = leaky_relu_sq_value(v[e], slope);
    store8(post + t * 8, v);
  }
}

__global__ void leaky_relu_sq_backward_kernel(const bf16* dpost, const bf16* __restrict__ pre, bf16* dpre,
                                              int64_t vecs, float slope) {
  const float slope_sq = slope * slope;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < vecs;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float d[8], p[8];
    load8(dpost + t * 8, d);
    load8(pre + t * 8, p);
#pragma unroll
    for (int e = 0; e < 8; ++e) d[e] = leaky_relu_sq_gradient(d[e], p[e], slope_sq);
    store8(dpre + t * 8, d);
  }
}

}  // namespace

void leaky_relu_sq_forward(const bf16* pre, bf16* post, int64_t n, float slope, cudaStream_t stream) {
  PG_CUDA_REQUIRE(n % 8 == 0, "leaky_relu_sq_forward: the element count must be a multiple of 8");
  if (n == 0) return;
  const int threads = 256;
  leaky_relu_sq_forward_kernel<<<item_blocks(n / 8, threads, 8192), threads, 0, stream>>>(pre, post, n / 8, slope);
  PG_CUDA_LAUNCH_CHECK();
}

void leaky_relu_sq_backward(const bf16* dpost, const bf16* pre, bf16* dpre, int64_t n, float slope,
                            cudaStream_t stream) {
  PG_CUDA_REQUIRE(n % 8 == 0, "leaky_relu_sq_backward: the element count must be a multiple of 8");
  if (n == 0) return;
  const int threads = 256;
  leaky_relu_sq_backward_kernel<<<item_blocks(n / 8, threads, 8192), threads, 0, stream>>>(dpost, pre, dpre, n / 8,
                                                                                          slope);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
