// Gated attention on the device (twin of cpu/head_gate.h): gate = σ(logit + bias) per (token, head)
// scales that head's attention output. Logits come from a small GEMM into rows of logits_ld ≥ H
// values (padded so that every row is 16-byte aligned). y [N, H, Dh] bf16, Dh a multiple of 8;
// H divides 64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {

struct HeadGateShape {
  int64_t tokens = 0;
  int heads = 0, head_dim = 0;
  int64_t logits_ld = 0;  // row stride of logits / dlogits
};

// logits fp32 [N, logits_ld]; gate [N, H] fp32 saved; y_out bf16 (may alias y_in).
void head_gate_forward(const __nv_bfloat16* y_in, const float* logits, const float* bias, float* gate,
                       __nv_bfloat16* y_out, const HeadGateShape& shape, cudaStream_t stream);

// dy_in = gate·dy_out (bf16, written); dlogits = (dy_out·y_in)·g(1−g) (bf16 [N, logits_ld], written,
// the padding columns zero); dbias += Σ_tokens dlogits (null: skipped).
void head_gate_backward(const __nv_bfloat16* dy_out, const __nv_bfloat16* y_in, const float* gate,
                        __nv_bfloat16* dy_in, __nv_bfloat16* dlogits, float* dbias, const HeadGateShape& shape,
                        const ReduceWorkspace& ws, cudaStream_t stream);

size_t head_gate_workspace_floats(const HeadGateShape& shape);

}  // namespace pgolf::cuda
