// Per-row LoRA adapters on the device (twin of cpu/lora.h): row b of the batch (one document) has
// A_b [r, in] and B_b [out, r]; for its T tokens y_b += (x_b A_bᵀ) B_bᵀ. Every product is one strided
// batched cuBLASLt GEMM over the rows. x and y may be column slices of wider matrices (row strides
// x_ld, y_ld), e.g. y = the q columns of the fused projection output. in, out and rank multiples of 8.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/gemm.h"
#include "model/lora_segment.h"
#include "optim/update_math.h"

namespace pgolf::cuda {

struct LoraGemmShape {
  int rows = 0;     // batch rows, one adapter pair each
  int seq_len = 0;  // tokens per row
  int in = 0, out = 0, rank = 0;
  int64_t x_ld = 0, y_ld = 0;  // row strides of x / dx and y / dy (0: in, out)
  bool accumulate = true;      // the backward adds to dA, dB (false: overwrites them)
};

// h [rows·T, r] = x Aᵀ (saved), y += h Bᵀ (bf16, in place). A [rows, r, in], B [rows, out, r] bf16.
void lora_forward(GemmRunner& gemm, const __nv_bfloat16* x, const __nv_bfloat16* A, const __nv_bfloat16* B,
                  __nv_bfloat16* h, __nv_bfloat16* y, const LoraGemmShape& shape, cudaStream_t stream);

// dB_b += dy_bᵀ h_b; dh = dy_b B_b (bf16 scratch [rows·T, r]); dA_b += dhᵀ x_b; dx_b += dh A_b (fp32,
// may be null). dA, dB fp32 in the A / B layouts; `=` instead of `+=` for them without shape.accumulate.
void lora_backward(GemmRunner& gemm, const __nv_bfloat16* dy, const __nv_bfloat16* x, const __nv_bfloat16* A,
                   const __nv_bfloat16* B, const __nv_bfloat16* h, __nv_bfloat16* dh, float* dx, float* dA, float* dB,
                   const LoraGemmShape& shape, cudaStream_t stream);

// Over the first `rows` rows of `count` segments (a device table; max_per_row = the largest per_row):
// out = bf16(in); one AdamW step of p with g and the moments m, v (the same layout), the
// coefficients read on the device (so that a captured step replays with the current ones), and, when
// p16 is given, p16 = bf16(p) of the new values. m may be null when beta1 = 0 (the first moment is g).
void lora_rows_to_bf16(const float* in, __nv_bfloat16* out, const LoraRowSegment* segments, int count, int64_t rows,
                       int64_t max_per_row, cudaStream_t stream);
void lora_rows_adamw(float* p, const float* g, float* m, float* v, __nv_bfloat16* p16, const optim::AdamCoeffs* coeffs,
                     const LoraRowSegment* segments, int count, int64_t rows, int64_t max_per_row, cudaStream_t stream);
// *device = value, in stream order.
void write_adam_coeffs(optim::AdamCoeffs* device, const optim::AdamCoeffs& value, cudaStream_t stream);

// dst[k] = U(-bound, bound) for k in [0, n): the values Rng(seed) gives at its draws first + k
// (splitmix64 is counter-based: draw j mixes seed + (j + 1)·γ), bit for bit as on the host (the
// affine map in round-to-nearest double arithmetic, without contraction, then rounded to float).
void lora_uniform(float* dst, int64_t n, uint64_t seed, uint64_t first, double bound, cudaStream_t stream);

}  // namespace pgolf::cuda
