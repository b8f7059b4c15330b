#include "backend/cuda/check.h"
#include "backend/cuda/embedding.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

// One thread per 8 features of one token.
__global__ void embedding_forward_kernel(const int32_t* __restrict__ ids, const bf16* __restrict__ table, int64_t n,
                                         int dim, bf16* __restrict__ out, const EmbeddingAddends add) {
  const int vecs = dim / 8;
  const float scale = add.dense_scale ? *add.dense_scale : 0.f;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n * vecs;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / vecs;
    const int f0 = static_cast<int>(t % vecs) * 8;
    float v[8], w[8];
    load8(table + static_cast<int64_t>(ids[i]) * dim + f0, v);
    if (add.ids2) {
      load8(add.table2 + static_cast<int64_t>(add.ids2[i]) * dim + f0, w);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += w[e];
    }
    if (add.dense) {
      load8(add.dense + i * dim + f0, w);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += scale * w[e];
    }
    store8(out + i * dim + f0, v);
  }
}

__global__ void embedding_backward_kernel(const int32_t* __restrict__ ids, int64_t n, const float* __restrict__ dout,
                                          int dim, float* __restrict__ dtable) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n * dim;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / dim;
    atomicAdd(dtable + static_cast<int64_t>(ids[i]) * dim + t % dim, dout[t]);
  }
}

}  // namespace

void embedding_forward(const int32_t* ids, const bf16* table, int64_t n, int dim, bf16* out,
                       const EmbeddingAddends& addends, cudaStream_t stream) {
  PG_CUDA_REQUIRE(dim > 0 && dim % 8 == 0, "embedding_forward: dim must be a positive multiple of 8");
  PG_CUDA_REQUIRE((addends.ids2 == nullptr) == (addends.table2 == nullptr),
                  "embedding_forward: ids2 and table2 come together");
  PG_CUDA_REQUIRE((addends.dense == nullptr) == (addends.dense_scale == nullptr),
                  "embedding_forward: dense and dense_scale come together");
  if (n == 0) return;
  const int threads = 256;
  embedding_forward_kernel<<<item_blocks(n * (dim / 8), threads), threads, 0, stream>>>(ids, table, n, dim, out,
                                                                                       addends);
  PG_CUDA_LAUNCH_CHECK();
}

void embedding_backward(const int32_t* ids, int64_t n, const float* dout, int dim, float* dtable,
                        cudaStream_t stream) {
  if (n == 0 || dim == 0) return;
  const int threads = 256;
  embedding_backward_kernel<<<item_blocks(n * dim, threads), threads, 0, stream>>>(ids, n, dout, dim, dtable);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
