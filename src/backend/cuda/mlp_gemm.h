// The MLP's first product and its gradient with the activation fused into the epilogue (Hopper
// wgmma, sm_90a): the same values as the cuBLASLt product followed by the separate pass of
// activation.h, up to the product's fp32 summation order, without the pass's extra trip through
// memory.
//   forward   pre = bf16(m · Wfcᵀ),  post = bf16(leaky(pre)²)          (post from the rounded pre)
//   backward  dpre = bf16(bf16(df · Wproj) · f'(pre))                  (no dpost written)
// m, df [rows, dim]; Wfc [hidden, dim]; Wproj [dim, hidden]; pre, post, dpre [rows, hidden]; bf16,
// row-major, contiguous, 16-byte aligned. The forward's pre may be null (not written) when no backward
// reads it: post is the same.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/qk_norm_rope.h"

namespace pgolf::cuda {

// Whether the fused kernels serve this shape on the current device: dim 512, hidden a positive
// multiple of 128 and an sm_90 GPU (the kernels trap when the binary lacks sm_90a code, as the wgmma
// attention kernels do).
bool mlp_fused_supported(int dim, int hidden);

// How the mainloop feeds the MMAs (mlp_gemm.cu); both give bit-identical results. Measured on an H100
// (bench_cuda --only mlp, 98,304 rows): both products are faster with A resident (hidden 1536: forward
// 0.319 against 0.363 ms, backward 0.350 against 0.367; hidden 1024: 0.230 against 0.257, 0.251
// against 0.260), so that is the default.
enum class MlpSchedule {
  resident_a,         // A's 128 x 512 rows stay in shared memory, B streams through 4 stages
  streamed_operands,  // A and B slices stream through 6 stages
};

// hidden_splits: how many runs of consecutive 128-column tiles the hidden dimension is cut into, each
// run a CTA of its own per 128 rows (bit-identical for every count). 0 chooses: 1 while the row blocks
// fill whole waves of the multiprocessors (training batches), more for few rows (LoRA TTT's calls of a
// few thousand tokens), where one CTA per 128 rows would leave most multiprocessors idle.
// The count hidden_splits = 0 chooses for `rows` rows on a GPU of `multiprocessors` SMs.
int mlp_fused_hidden_splits(int64_t rows, int hidden, int multiprocessors);

void mlp_fused_forward(const __nv_bfloat16* m, const __nv_bfloat16* wfc, __nv_bfloat16* pre, __nv_bfloat16* post,
                       int64_t rows, int dim, int hidden, float slope, cudaStream_t stream,
                       MlpSchedule schedule = MlpSchedule::resident_a, int hidden_splits = 0);

void mlp_fused_backward(const __nv_bfloat16* df, const __nv_bfloat16* wproj, const __nv_bfloat16* pre,
                        __nv_bfloat16* dpre, int64_t rows, int dim, int hidden, float slope, cudaStream_t stream,
                        MlpSchedule schedule = MlpSchedule::resident_a, int hidden_splits = 0);

// The attention's input product on the same kernel, with the per-head preparation of q and k in its
// epilogue:
//   qkv = bf16(n · Wqkvᵀ) [rows, (H + 2·Hkv)·64]  (columns: q heads, k heads, v heads)
//   q, k, q_rstd, k_rstd = qk_norm_rope_forward(qkv's q and k columns)   (qk_norm_rope.h)
// The epilogue runs the separate pass's fp32 operations on the kernel's own rounded qkv, so q, k and the
// rstds are that pass's bits on this qkv; qkv itself equals cuBLASLt's up to the summation order. With
// write_qk_lin false only v's columns of qkv are written (nothing reads q's and k's without a backward).
// Served (qkv_fused_supported): an sm_90 GPU, dim 512, head_dim 64, even H and Hkv (q and k in whole
// 128-column tiles), rope_dims 0, 16, 32 or 64 (a lane holds both chunks of each RoPE pair).
bool qkv_fused_supported(int dim, const QkShape& shape);

void qkv_fused_forward(const __nv_bfloat16* n, const __nv_bfloat16* wqkv, __nv_bfloat16* qkv, bool write_qk_lin,
                       const float* gain, const float* rope_cos, const float* rope_sin, __nv_bfloat16* q,
                       __nv_bfloat16* k, float* q_rstd, float* k_rstd, const QkShape& shape, int dim,
                       cudaStream_t stream, MlpSchedule schedule = MlpSchedule::resident_a, int hidden_splits = 0);

}  // namespace pgolf::cuda
