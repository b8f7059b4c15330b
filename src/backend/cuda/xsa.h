// Exclusive self-attention on the device (twin of cpu/xsa.h): y_h ← y_h − (y_h·v̂)v̂ with
// v̂ = v_g / max(‖v_g‖, 1e-12), g = h / (H/Hkv). y [N, H, Dh], v [N, Hkv, Dh] bf16; head_dim 8, 16, 32 or 64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

void xsa_forward(const __nv_bfloat16* y, const __nv_bfloat16* v, __nv_bfloat16* y_out, int64_t N, int heads,
                 int kv_heads, int head_dim, cudaStream_t stream);

// dy_in = (I − v̂v̂ᵀ)dy_out (bf16, written); dv = the gradient through v̂ summed over the group's heads
// (fp32, written). With delta (head_dim 64): also the attention backward's D = rowsum(dy_in ∘ y) with y
// the attention output, written at head·N + token (attention_backward_delta), so that the backward need
// not read dy_in and y again.
void xsa_backward(const __nv_bfloat16* dy_out, const __nv_bfloat16* y, const __nv_bfloat16* v, __nv_bfloat16* dy_in,
                  float* dv, int64_t N, int heads, int kv_heads, int head_dim, cudaStream_t stream,
                  float* delta = nullptr);

}  // namespace pgolf::cuda
