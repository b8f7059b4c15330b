// Per-row LoRA adapters on the device (twin of cpu/lora.h): row b of the batch (one document) has
// A_b [r, in] and B_b [out, r]; for its T tokens y_b += (x_b A_bᵀ) B_bᵀ. Every product is one strided
// batched cuBLASLt GEMM over the rows. x and y may be column slices of wider matrices (row strides
// x_ld, y_ld), e.g. y = the q columns of the fused projection output. in, out and rank multiples of 8.
// Adapters that read the same x (a lora_layout group) store their A_b side by side, [g·r, in] per row:
// lora_hidden and lora_backward_in with rank g·r then serve the whole group in one product, and each
// adapter's h is a column slice of the group's (h_ld = g·r).
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
  int64_t a_stride = 0;        // values from row b's A (and dA) to row b + 1's (0: rank·in)
  int64_t h_ld = 0;            // row stride of h and dh (0: rank)
};

// h [rows·T, r] = x Aᵀ (bf16): the first half of the forward.
void lora_hidden(GemmRunner& gemm, const __nv_bfloat16* x, const __nv_bfloat16* A, __nv_bfloat16* h,
                 const LoraGemmShape& shape, cudaStream_t stream);
// y += h Bᵀ (bf16, in place). B [rows, out, r] bf16.
void lora_apply(GemmRunner& gemm, const __nv_bfloat16* h, const __nv_bfloat16* B, __nv_bfloat16* y,
                const LoraGemmShape& shape, cudaStream_t stream);
// Both: h = x Aᵀ (saved), y += h Bᵀ.
void lora_forward(GemmRunner& gemm, const __nv_bfloat16* x, const __nv_bfloat16* A, const __nv_bfloat16* B,
                  __nv_bfloat16* h, __nv_bfloat16* y, const LoraGemmShape& shape, cudaStream_t stream);

// The output side of the backward: dB_b += dy_bᵀ h_b (fp32, in B's layout; skipped when dB is null);
// dh = dy_b B_b (bf16).
void lora_backward_out(GemmRunner& gemm, const __nv_bfloat16* dy, const __nv_bfloat16* B, const __nv_bfloat16* h,
                       __nv_bfloat16* dh, float* dB, const LoraGemmShape& shape, cudaStream_t stream);
// The input side: dA_b += dh_bᵀ x_b (fp32, in A's layout; skipped when dA is null); dx_b += dh_b A_b
// (fp32, may be null).
void lora_backward_in(GemmRunner& gemm, const __nv_bfloat16* dh, const __nv_bfloat16* x, const __nv_bfloat16* A,
                      float* dA, float* dx, const LoraGemmShape& shape, cudaStream_t stream);
// The weight gradients alone (what the two above skip for a null dB / dA): nothing reads them before the
// optimizer step, so they may run on another stream. `=` instead of `+=` without shape.accumulate.
void lora_grad_b(GemmRunner& gemm, const __nv_bfloat16* dy, const __nv_bfloat16* h, float* dB,
                 const LoraGemmShape& shape, cudaStream_t stream);
void lora_grad_a(GemmRunner& gemm, const __nv_bfloat16* dh, const __nv_bfloat16* x, float* dA,
                 const LoraGemmShape& shape, cudaStream_t stream);

// Over the first `rows` rows of `count` segments (a device table; max_per_row = the largest per_row):
// out = bf16(in); one AdamW step of p with g and the moments m, v (the same layout), the
// coefficients read on the device (so that a captured step replays with the current ones), and, when
// p16 is given, p16 = bf16(p) of the new values. m may be null when beta1 = 0 (the first moment is g).
void lora_rows_to_bf16(const float* in, __nv_bfloat16* out, const LoraRowSegment* segments, int count, int64_t rows,
                       int64_t max_per_row, cudaStream_t stream);
void lora_rows_adamw(float* p, const float* g, float* m, float* v, __nv_bfloat16* p16, const optim::AdamCoeffs* coeffs,
                     const LoraRowSegment* segments, int count, int64_t rows, int64_t max_per_row, cudaStream_t stream);
// Process-wide, on by default: the two passes above walk segments whose offsets and row sizes are
// multiples of 4 four values a thread (vector loads and stores; the same arithmetic, the same bits). Off:
// one value a thread, as a reference for the tests.
void set_lora_vector_access(bool on);
bool lora_vector_access();
// *device = value, in stream order.
void write_adam_coeffs(optim::AdamCoeffs* device, const optim::AdamCoeffs& value, cudaStream_t stream);

// Draw k in [0, n) = U(-bound, bound), the value Rng(seed) gives at its draw first + k (splitmix64 is
// counter-based: draw j mixes seed + (j + 1)·γ), bit for bit as on the host (the affine map in
// round-to-nearest double arithmetic, without contraction, then rounded to float), stored at
// dst[(k / block)·block_stride + k % block] (block = block_stride = n: contiguous).
void lora_uniform(float* dst, int64_t n, uint64_t seed, uint64_t first, double bound, int64_t block,
                  int64_t block_stride, cudaStream_t stream);

}  // namespace pgolf::cuda
