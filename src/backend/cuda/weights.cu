#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/weights.h"

namespace pgolf::cuda {
namespace {

// One warp per row of the concatenated copies.
__global__ void refresh_kernel(const float* __restrict__ params, bf16* __restrict__ out,
                               const WeightCopy* __restrict__ copies, int n_copies, int64_t total_rows,
                               bool quantize) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < total_rows;
       row += (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5) {
    int lo = 0, hi = n_copies - 1;  // the last copy whose first row is <= row
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (copies[mid].first_row <= row) lo = mid;
      else hi = mid - 1;
    }
    const WeightCopy c = copies[lo];
    const int64_t r = row - c.first_row;
    const float* src = params + c.src + r * c.cols;
    bf16* dst = out + c.dst + r * c.cols;
    if (quantize && c.quantize) {
      float row_max = 0.f;
      for (int j = lane; j < c.cols; j += 32) row_max = fmaxf(row_max, fabsf(src[j]));
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
      const float scale = fmaxf(row_max / 31.f, 1.f / 31.f);
      for (int j = lane; j < c.cols; j += 32) {
        const float q = fminf(fmaxf(rintf(src[j] / scale), -32.f), 31.f);
        dst[j] = __float2bfloat16(q * scale);
      }
    } else {
      for (int j = lane; j < c.cols; j += 32) dst[j] = __float2bfloat16(src[j]);
    }
  }
}

__global__ void cast_kernel(const float* __restrict__ in, bf16* __restrict__ out, int64_t n) {
  pdl_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

}  // namespace

void refresh_bf16_weights(const float* params, bf16* out, const WeightCopy* copies, int n_copies, int64_t total_rows,
                          bool quantize, cudaStream_t stream) {
  if (n_copies == 0 || total_rows == 0) return;
  const int threads = 256;
  launch_kernel(refresh_kernel, item_blocks(total_rows * 32, threads), threads, 0, stream, params, out, copies,
                n_copies, total_rows, quantize);
  PG_CUDA_LAUNCH_CHECK();
}

void cast_to_bf16(const float* in, bf16* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  launch_kernel(cast_kernel, item_blocks(n, threads), threads, 0, stream, in, out, n);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
