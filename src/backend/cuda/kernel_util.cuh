// Device helpers shared by the elementwise, norm and loss kernels: 16-byte vector loads and stores
// of 8 values (bf16 or fp32) converted to fp32 registers, warp sums, and the per-block partial sums
// that make reductions over token rows deterministic (reduce.h finishes them).
//
// Row kernels walk token rows one warp per row: lane l owns the 8-feature vectors l, l + 32, ...
// of every row (kVec of them), so a lane's per-feature sums always belong to the same features and
// a block can reduce them without atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "backend/cuda/check.h"

namespace pgolf::cuda {

using bf16 = __nv_bfloat16;

constexpr float kRmsNormEpsF = 1.1920928955078125e-07f;  // 2⁻²³ = torch.finfo(float32).eps (cpu/rmsnorm.h)

constexpr int kRowWarps = 8;  // warps (rows in flight) per block of a row kernel
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kMaxRowBlocks = 528;  // 4 per multiprocessor of an H100: fixed partial-sum rows

// Blocks of a row kernel over `rows` rows (grid-stride beyond): depends on the size only, so the
// partial sums and their order are the same on every run.
inline int row_blocks(int64_t rows) {
  const int64_t b = (rows + kRowWarps - 1) / kRowWarps;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxRowBlocks ? kMaxRowBlocks : b));
}

// Blocks of `threads` threads for `items` independent items, capped (grid-stride beyond).
inline int item_blocks(int64_t items, int threads, int cap = 4096) {
  const int64_t b = (items + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > cap ? cap : b));
}

// Row kernels hold kVec vectors of 8 features per lane: 2 for rows up to 512 features, 4 up to 1024.
inline void check_row_dim(int dim, const char* what) {
  if (dim > 0 && dim % 8 == 0 && dim <= 1024) return;
  const std::string msg = std::string(what) + ": rows of " + std::to_string(dim) +
                          " features; a positive multiple of 8, at most 1024, is expected";
  raise_error(msg.c_str(), __FILE__, __LINE__);
}
template <typename F>
void dispatch_row_vec(int dim, F&& launch) {
  if (dim <= 512) launch(std::integral_constant<int, 2>{});
  else launch(std::integral_constant<int, 4>{});
}

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ __forceinline__ void load8(const bf16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void store8(bf16* p, const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// Per-lane feature sums acc[k][e] (feature (lane + 32k)·8 + e) of every warp of the block → one
// partial row out[0, dim) of this block, summed over the warps in a fixed order. `smem` holds
// kRowWarps · dim floats. Every thread of the block must call it.
template <int kVec>
__device__ void store_column_partials(const float (&acc)[kVec][8], float* smem, float* out, int dim) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int f0 = (lane + 32 * k) * 8;
    if (f0 < dim) {
#pragma unroll
      for (int e = 0; e < 8; ++e) smem[warp * dim + f0 + e] = acc[k][e];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < kRowWarps; ++w) s += smem[w * dim + c];
    out[c] = s;
  }
  __syncthreads();
}

// One value per thread → the block's sum in *out (thread 0 writes). `smem` holds 32 floats. Every
// thread of the block must call it.
__device__ inline void store_scalar_partial(float x, float* smem, float* out) {
  x = warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += smem[w];
    *out = s;
  }
  __syncthreads();
}

}  // namespace pgolf::cuda
