#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/embedding.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

// One thread per 8 features of one token.
__global__ void embedding_forward_kernel(const int32_t* __restrict__ ids, const bf16* __restrict__ table, int64_t n,
                                         int dim, bf16* __restrict__ out, const EmbeddingAddends add) {
  pdl_prologue();
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
  pdl_prologue();
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n * dim;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / dim;
    atomicAdd(dtable + static_cast<int64_t>(ids[i]) * dim + t % dim, dout[t]);
  }
}

__global__ void iota_kernel(int32_t* __restrict__ out, int64_t n) {
  pdl_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<int32_t>(i);
}

// One warp per position of the sorted ids; the warp at the start of a run of equal ids adds the run's
// dout rows, in token order, to that id's table row (lanes over the features).
__global__ void sum_sorted_runs_kernel(const int32_t* __restrict__ keys, const int32_t* __restrict__ tokens,
                                       int64_t n, const float* __restrict__ dout, int dim,
                                       float* __restrict__ dtable) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (i >= n || (i > 0 && keys[i - 1] == keys[i])) return;
  const int32_t key = keys[i];
  int64_t end = i + 1;
  while (end < n && keys[end] == key) ++end;
  for (int f = lane; f < dim; f += 32) {
    float s = 0.f;
    for (int64_t j = i; j < end; ++j) s += dout[static_cast<int64_t>(tokens[j]) * dim + f];
    dtable[static_cast<int64_t>(key) * dim + f] += s;
  }
}

struct SortBuffers {
  int32_t *keys, *tokens_in, *tokens;
  void* temp;
  size_t temp_bytes;
};

int64_t round256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// [sorted keys | token indices | sorted token indices | CUB's temporary storage]
SortBuffers carve(void* workspace, int64_t n, size_t bytes) {
  char* p = static_cast<char*>(workspace);
  const int64_t ints = round256(n * 4);
  SortBuffers b{reinterpret_cast<int32_t*>(p), reinterpret_cast<int32_t*>(p + ints),
                reinterpret_cast<int32_t*>(p + 2 * ints), p + 3 * ints, 0};
  b.temp_bytes = bytes > static_cast<size_t>(3 * ints) ? bytes - static_cast<size_t>(3 * ints) : 0;
  return b;
}

size_t radix_temp_bytes(int64_t n, int end_bit) {
  size_t bytes = 0;
  PG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, end_bit));
  return bytes;
}

}  // namespace

size_t embedding_sort_workspace_bytes(int64_t max_n) {
  return static_cast<size_t>(3 * round256(max_n * 4) + round256(static_cast<int64_t>(radix_temp_bytes(max_n, 32))));
}

void embedding_backward_sorted(const int32_t* ids, int64_t n, const float* dout, int dim, float* dtable,
                               int table_rows, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (n == 0 || dim == 0) return;
  PG_CUDA_REQUIRE(table_rows >= 1 && n <= INT32_MAX, "embedding_backward_sorted: table rows and token count");
  int end_bit = 1;
  while (end_bit < 31 && (int64_t{1} << end_bit) < table_rows) ++end_bit;
  SortBuffers b = carve(workspace, n, workspace_bytes);
  size_t temp_bytes = radix_temp_bytes(n, end_bit);
  PG_CUDA_REQUIRE(workspace != nullptr && temp_bytes <= b.temp_bytes,
                  "embedding_backward_sorted: the workspace is smaller than embedding_sort_workspace_bytes(n)");
  const int threads = 256;
  launch_kernel(iota_kernel, item_blocks(n, threads), threads, 0, stream, b.tokens_in, n);
  PG_CUDA_LAUNCH_CHECK();
  PG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp, temp_bytes, ids, b.keys, b.tokens_in, b.tokens,
                                                static_cast<int>(n), 0, end_bit, stream));
  launch_kernel(sum_sorted_runs_kernel, static_cast<unsigned>((n * 32 + threads - 1) / threads), threads, 0, stream,
                b.keys, b.tokens, n, dout, dim, dtable);
  PG_CUDA_LAUNCH_CHECK();
}

void embedding_forward(const int32_t* ids, const bf16* table, int64_t n, int dim, bf16* out,
                       const EmbeddingAddends& addends, cudaStream_t stream) {
  PG_CUDA_REQUIRE(dim > 0 && dim % 8 == 0, "embedding_forward: dim must be a positive multiple of 8");
  PG_CUDA_REQUIRE((addends.ids2 == nullptr) == (addends.table2 == nullptr),
                  "embedding_forward: ids2 and table2 come together");
  PG_CUDA_REQUIRE((addends.dense == nullptr) == (addends.dense_scale == nullptr),
                  "embedding_forward: dense and dense_scale come together");
  if (n == 0) return;
  const int threads = 256;
  launch_kernel(embedding_forward_kernel, item_blocks(n * (dim / 8), threads), threads, 0, stream, ids, table, n, dim,
                out, addends);
  PG_CUDA_LAUNCH_CHECK();
}

void embedding_backward(const int32_t* ids, int64_t n, const float* dout, int dim, float* dtable,
                        cudaStream_t stream) {
  if (n == 0 || dim == 0) return;
  const int threads = 256;
  launch_kernel(embedding_backward_kernel, item_blocks(n * dim, threads), threads, 0, stream, ids, n, dout, dim,
                dtable);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
