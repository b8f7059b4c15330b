#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

#define PG_VECS_OF_GRID(t, vecs)                                                                      \
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < (vecs); \
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void scaled_add_forward_kernel(const bf16* __restrict__ x, const float* __restrict__ s, bf16* y,
                                          int64_t vecs, bool accumulate) {
  pdl_prologue();
  const float sv = *s;
  PG_VECS_OF_GRID(t, vecs) {
    float a[8], o[8] = {};
    load8(x + t * 8, a);
    if (accumulate) load8(y + t * 8, o);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] += sv * a[e];
    store8(y + t * 8, o);
  }
}

__global__ void scaled_add_backward_kernel(const float* __restrict__ dy, const bf16* __restrict__ x,
                                           const float* __restrict__ s, bf16* __restrict__ dx,
                                           float* __restrict__ partials, int64_t vecs) {
  pdl_prologue();
  __shared__ float smem[32];
  const float sv = *s;
  float acc = 0.f;
  PG_VECS_OF_GRID(t, vecs) {
    float d[8];
    load8(dy + t * 8, d);
    if (partials) {
      float a[8];
      load8(x + t * 8, a);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += d[e] * a[e];
    }
    if (dx) {
#pragma unroll
      for (int e = 0; e < 8; ++e) d[e] *= sv;
      store8(dx + t * 8, d);
    }
  }
  if (partials) store_scalar_partial(acc, smem, partials + blockIdx.x);
}

__global__ void add_f32_kernel(float* __restrict__ dst, const float* __restrict__ src, int64_t vecs) {
  pdl_prologue();
  PG_VECS_OF_GRID(t, vecs) {
    float a[8], b[8];
    load8(dst + t * 8, a);
    load8(src + t * 8, b);
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] += b[e];
    store8(dst + t * 8, a);
  }
}

// One vector of 8 per thread: row i = t / (cols / 8) of src to row index[i] of dst.
__global__ void scatter_rows_f32_kernel(const float* __restrict__ src, const int32_t* __restrict__ index, int64_t vecs,
                                        int row_vecs, float* __restrict__ dst) {
  pdl_prologue();
  PG_VECS_OF_GRID(t, vecs) {
    const int64_t i = t / row_vecs, c = t % row_vecs;
    float a[8];
    load8(src + t * 8, a);
    store8(dst + (static_cast<int64_t>(index[i]) * row_vecs + c) * 8, a);
  }
}

void check_count(int64_t n, const char* what) { PG_CUDA_REQUIRE(n % 8 == 0, what); }

}  // namespace

int elementwise_blocks(int64_t n) { return item_blocks(n / 8, kThreads, kMaxRowBlocks); }

void scaled_add_forward(const bf16* x, const float* s, bf16* y, int64_t n, bool accumulate, cudaStream_t stream) {
  check_count(n, "scaled_add_forward: the element count must be a multiple of 8");
  if (n == 0) return;
  launch_kernel(scaled_add_forward_kernel, item_blocks(n / 8, kThreads, 8192), kThreads, 0, stream, x, s, y, n / 8,
                accumulate);
  PG_CUDA_LAUNCH_CHECK();
}

void scaled_add_backward(const float* dy, const bf16* x, const float* s, bf16* dx, float* ds, int64_t n,
                         const ReduceWorkspace& ws, cudaStream_t stream) {
  check_count(n, "scaled_add_backward: the element count must be a multiple of 8");
  if (n == 0 || (!dx && !ds)) return;
  const int blocks = elementwise_blocks(n);
  if (ds) check_reduce_workspace(ws, blocks, 1, "scaled_add_backward");
  launch_kernel(scaled_add_backward_kernel, blocks, kThreads, 0, stream, dy, x, s, dx, ds ? ws.data : nullptr, n / 8);
  PG_CUDA_LAUNCH_CHECK();
  if (ds) finish_partial_sums(ws.data, blocks, {{ds, 1}}, stream);
}

void scatter_rows_f32(const float* src, const int32_t* index, int64_t rows, int cols, float* dst, int64_t n_rows,
                      cudaStream_t stream) {
  check_count(cols, "scatter_rows_f32: the row length must be a multiple of 8");
  PG_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(n_rows) * cols * sizeof(float), stream));
  const int64_t vecs = rows * (cols / 8);
  if (vecs == 0) return;
  launch_kernel(scatter_rows_f32_kernel, item_blocks(vecs, kThreads, 8192), kThreads, 0, stream, src, index, vecs,
                cols / 8, dst);
  PG_CUDA_LAUNCH_CHECK();
}

void add_f32(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  check_count(n, "add_f32: the element count must be a multiple of 8");
  if (n == 0) return;
  launch_kernel(add_f32_kernel, item_blocks(n / 8, kThreads, 8192), kThreads, 0, stream, dst, src, n / 8);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
