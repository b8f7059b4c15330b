#include "backend/cuda/averaging.h"
#include "backend/cuda/check.h"
#include "optim/update_math.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) ema_kernel(float* __restrict__ ema, const float* __restrict__ theta,
                                                       int64_t count, float decay, float one_minus_decay) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t vectors = count / 4;
  for (int64_t v = tid; v < vectors; v += stride) {
    float4 e = reinterpret_cast<const float4*>(ema)[v];
    const float4 t = reinterpret_cast<const float4*>(theta)[v];
    e.x = optim::ema_update(e.x, t.x, decay, one_minus_decay);
    e.y = optim::ema_update(e.y, t.y, decay, one_minus_decay);
    e.z = optim::ema_update(e.z, t.z, decay, one_minus_decay);
    e.w = optim::ema_update(e.w, t.w, decay, one_minus_decay);
    reinterpret_cast<float4*>(ema)[v] = e;
  }
  for (int64_t i = vectors * 4 + tid; i < count; i += stride)
    ema[i] = optim::ema_update(ema[i], theta[i], decay, one_minus_decay);
}

// A warp per row: the row's max |w| (exact in any order), then every value quantized.
__global__ void __launch_bounds__(kThreads) fake_quant_rows(const float* __restrict__ w, int64_t rows, int64_t cols,
                                                            float qmin, float qmax, __nv_bfloat16* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float* in = w + row * cols;
  float row_max = 0.0f;
  for (int64_t j = lane; j < cols; j += 32) row_max = fmaxf(row_max, fabsf(in[j]));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
  const float scale = fmaxf(row_max / qmax, 1.0f / qmax);
  for (int64_t j = lane; j < cols; j += 32)
    out[row * cols + j] = __float2bfloat16_rn(optim::fake_quant_value(in[j], scale, qmin, qmax));
}

}  // namespace

void ema_update(float* ema, const float* theta, int64_t count, double decay, cudaStream_t stream) {
  PG_CUDA_REQUIRE(reinterpret_cast<uintptr_t>(ema) % 16 == 0 && reinterpret_cast<uintptr_t>(theta) % 16 == 0,
                  "ema_update: both arrays must be 16-byte aligned");
  if (count == 0) return;
  const int64_t blocks_needed = (count / 4 + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks_needed < 1 ? 1 : (blocks_needed > 8192 ? 8192 : blocks_needed));
  // The fp32 coefficients as the CPU Ema forms them.
  ema_kernel<<<blocks, kThreads, 0, stream>>>(ema, theta, count, static_cast<float>(decay),
                                              static_cast<float>(1.0 - decay));
  PG_CUDA_LAUNCH_CHECK();
}

void fake_quantize_rows_bf16(const float* w, int64_t rows, int64_t cols, int bits, __nv_bfloat16* out,
                             cudaStream_t stream) {
  PG_CUDA_REQUIRE(bits >= 2 && bits <= 8, "fake_quantize_rows_bf16: qat_bits must be in 2..8");
  PG_CUDA_REQUIRE(rows >= 0 && cols >= 0, "fake_quantize_rows_bf16: negative size");
  if (rows == 0 || cols == 0) return;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  constexpr int kRowsPerBlock = kThreads / 32;
  fake_quant_rows<<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), kThreads, 0, stream>>>(
      w, rows, cols, -qmax - 1.0f, qmax, out);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
