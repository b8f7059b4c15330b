// Exclusive self-attention (XSA, SPEC §3.5.7): remove from each query head's attention output the
// component along its own token's normalized value vector of the head's KV group:
//   v̂ = v_g / max(‖v_g‖₂, 1e-12),  y_h ← y_h − (y_h·v̂) v̂   (g = h / (H/Hkv)).
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// y_in, y_out [N, H, Dh] (may alias); v [N, Hkv, Dh].
template <typename T>
void xsa_forward(const T* y_in, const T* v, T* y_out, int64_t N, int heads, int kv_heads, int head_dim);

// dy_in += P dy_out (P = I − v̂v̂ᵀ) and dv += the gradient through v̂, from the forward's y_in and v.
template <typename T>
void xsa_backward(const T* dy_out, const T* y_in, const T* v, T* dy_in, T* dv, int64_t N, int heads, int kv_heads,
                  int head_dim);

}  // namespace pgolf::cpu
