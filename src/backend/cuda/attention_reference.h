// Reference attention on the device for head dims the flash kernels do not take (the golden
// configurations have head dim 16, the tiny test models 8): the same contract as attention.h (causal
// GQA over cu_seqlens segments, token-major bf16 q/k/v/o, lse [H, N] fp32, scale 1/sqrt(Dh)), computed
// exactly in fp32 with one warp per (query token, head) and the segment's scores in shared memory.
// O(L²·Dh) work per head: for tests and small models, not for speed. head_dim a multiple of 8, ≤ 64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "backend/cuda/attention.h"

namespace pgolf::cuda {

// max_seqlen: the longest segment of cu_seqlens (sizes the shared memory).
void attention_reference_forward(const AttentionShape& shape, int head_dim, int max_seqlen, const __nv_bfloat16* q,
                                 const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o, float* lse,
                                 cudaStream_t stream);

size_t attention_reference_workspace_bytes(const AttentionShape& shape, int head_dim);

// dq, dk, dv written (bf16); dk and dv are summed in an fp32 workspace with atomics first.
void attention_reference_backward(const AttentionShape& shape, int head_dim, int max_seqlen, const __nv_bfloat16* q,
                                  const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* o,
                                  const float* lse, const __nv_bfloat16* d_o, __nv_bfloat16* dq, __nv_bfloat16* dk,
                                  __nv_bfloat16* dv, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace pgolf::cuda
