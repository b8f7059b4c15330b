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

}  // namespace pgolf::cuda
