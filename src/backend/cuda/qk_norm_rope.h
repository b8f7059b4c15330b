// The per-head preparation of q and k before attention, fused into one pass (twins: cpu rmsnorm over
// head_dim, cpu::rope_forward / rope_backward, cpu::head_scale_*): QK-norm (RMSNorm over each head's
// head_dim values), RoPE on the first rope_dims of each head (half-split, positions = token index mod
// seq_len, the fp32 cos/sin table of cpu::make_rope_table), and the per-head q gain.
//
// q_lin / k_lin are column slices of the fused projection output (row stride in_stride), q and k are
// written contiguous ([N, H, Dh], [N, Hkv, Dh] bf16, as attention reads them). head_dim: a multiple of
// 8, at most 64; lcm(num_heads + num_kv_heads, 4) at most 64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/attention.h"
#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {

struct QkShape {
  int64_t tokens = 0;   // N
  int64_t seq_len = 0;  // T: token i is at position i mod T
  int heads = 0, kv_heads = 0, head_dim = 0, rope_dims = 0;
};

// cos, sin: [T, rope_dims/2] fp32 (device). q_rstd [N, H], k_rstd [N, Hkv] are saved.
void qk_norm_rope_forward(const __nv_bfloat16* q_lin, const __nv_bfloat16* k_lin, int64_t in_stride,
                          const float* gain, const float* rope_cos, const float* rope_sin, __nv_bfloat16* q,
                          __nv_bfloat16* k, float* q_rstd, float* k_rstd, const QkShape& shape, cudaStream_t stream);

// The gradient of the forward's q: bf16 [N, H, Dh], or attention's fp32 sum before its finish pass
// (attention_backward_unfinished), read as bf16(scale · sum), bit for bit the finish pass's dq.
struct QkDq {
  QkDq(const __nv_bfloat16* rounded_) : rounded(rounded_) {}
  QkDq(const DqSum& sum_) : sum(sum_) {}
  const __nv_bfloat16* rounded = nullptr;
  DqSum sum{};
};

// From dq, dk (gradients of the forward's q and k): dq_lin, dk_lin written (bf16, row stride out_stride,
// e.g. slices of the fused projection's gradient); dgain [H] += Σ dq⊙q_rope (null: skipped).
void qk_norm_rope_backward(const QkDq& dq, const __nv_bfloat16* dk, const __nv_bfloat16* q_lin,
                           const __nv_bfloat16* k_lin, int64_t in_stride, const float* q_rstd, const float* k_rstd,
                           const float* gain, const float* rope_cos, const float* rope_sin, __nv_bfloat16* dq_lin,
                           __nv_bfloat16* dk_lin, int64_t out_stride, float* dgain, const QkShape& shape,
                           const ReduceWorkspace& ws, cudaStream_t stream);

size_t qk_norm_rope_workspace_floats(const QkShape& shape);

}  // namespace pgolf::cuda
