// Elementwise mixing ops of the residual stream, all on [N, d] token rows with per-feature [d] or
// scalar parameters (SPEC §3.4, §3.5, §3.7, §3.10). Backward ops accumulate (+=) into every gradient
// they produce; where an op is `out = x + ...` the identity path's gradient is dout itself and is
// left to the caller (the running gradient buffer simply continues).
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// resid_mix: out = mix[0]⊙x + mix[1]⊙x0, mix [2, d].
template <typename T>
void resid_mix_forward(const T* x, const T* x0, const T* mix, T* out, int64_t N, int64_t d);
template <typename T>
void resid_mix_backward(const T* dout, const T* x, const T* x0, const T* mix, T* dx, T* dx0, T* dmix, int64_t N,
                        int64_t d);

// Residual branch: out = x + scale⊙(g⊙a) with g = sigmoid(gate) when `gate` is given (s600 branch
// gates), else g = 1; a null x reads as zero (out = scale⊙a, the scaled lane inputs of s1560).
// out may alias x. Backward: da, dscale, dgate (each may be null).
template <typename T>
void branch_add_forward(const T* x, const T* a, const T* scale, const T* gate, T* out, int64_t N, int64_t d);
template <typename T>
void branch_add_backward(const T* dout, const T* a, const T* scale, const T* gate, T* da, T* dscale, T* dgate,
                         int64_t N, int64_t d);

// U-Net skip: without a gate out = x + w⊙s; with skip gates (s1560)
// out = lerp(w⊙s, x, sigmoid(gate)) = w⊙s + g⊙(x − w⊙s). Backward writes dx (+=), ds, dw, dgate.
template <typename T>
void skip_add_forward(const T* x, const T* s, const T* w, const T* gate, T* out, int64_t N, int64_t d);
template <typename T>
void skip_add_backward(const T* dout, const T* x, const T* s, const T* w, const T* gate, T* dx, T* ds, T* dw, T* dgate,
                       int64_t N, int64_t d);

// Parallel residual lanes (s1560): with resid = [r0, r1] and post = [[p00, p01], [p10, p11]]
// (row 0: the attention output's weights into lane 0 and 1, row 1: the MLP output's),
//   out0 = r0·lane0 + p00·a + p10·m,   out1 = r1·lane1 + p01·a + p11·m.
template <typename T>
void lane_update_forward(const T* lane0, const T* lane1, const T* a, const T* m, const T* resid, const T* post,
                         T* out0, T* out1, int64_t N, int64_t d);
template <typename T>
void lane_update_backward(const T* dout0, const T* dout1, const T* lane0, const T* lane1, const T* a, const T* m,
                          const T* resid, const T* post, T* dlane0, T* dlane1, T* da, T* dm, T* dresid, T* dpost,
                          int64_t N, int64_t d);

// Value residual (S562, SPEC §3.5.2) with lambda [2]: out = λ0·v0 + λ1·v, or out = v·(λ0+λ1) when
// v0 is null (the first layer). dv0 may be null when v0 is.
template <typename T>
void value_mix_forward(const T* v, const T* v0, const T* lambda, T* out, int64_t n);
template <typename T>
void value_mix_backward(const T* dout, const T* v, const T* v0, const T* lambda, T* dv, T* dv0, T* dlambda, int64_t n);

// Per-head gain (q_gain, SPEC §3.5.5): out[i, h, :] = x[i, h, :]·gain[h] for x [N, H, Dh] (out may
// alias x). Backward: dx += gain_h·dout (dx may be null), dgain_h += Σ dout⊙x (dgain may be null).
template <typename T>
void head_scale_forward(const T* x, const T* gain, T* out, int64_t N, int heads, int head_dim);
template <typename T>
void head_scale_backward(const T* dout, const T* x, const T* gain, T* dx, T* dgain, int64_t N, int heads, int head_dim);

// Scalar-weighted add: y (=|+=) s·x over n values; backward dx += s·dy, ds += Σ dy⊙x (either may be null).
template <typename T>
void scaled_add_forward(const T* x, T s, T* y, int64_t n, bool accumulate);
template <typename T>
void scaled_add_backward(const T* dy, const T* x, T s, T* dx, T* ds, int64_t n);

}  // namespace pgolf::cpu
