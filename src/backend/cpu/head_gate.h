// Gated attention (S562, SPEC §3.5.8): one sigmoid gate per query head and token scales that head's
// attention output, y_h ← y_h · sigmoid(logit_h). The logits (n·W_gᵀ + b) come from a linear op.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// y_in, y_out [N, H, Dh] (may alias), logits [N, H] without the bias, bias [H] (may be null);
// gate[N, H] = sigmoid(logits + bias) is saved.
template <typename T>
void head_gate_forward(const T* y_in, const T* logits, const T* bias, T* gate, T* y_out, int64_t N, int heads,
                       int head_dim);

// dy_in += gate·dy_out; dlogits += (dy_out·y_in)·gate·(1−gate); dbias += the same summed over tokens
// (dbias may be null).
template <typename T>
void head_gate_backward(const T* dy_out, const T* y_in, const T* gate, T* dy_in, T* dlogits, T* dbias, int64_t N,
                        int heads, int head_dim);

}  // namespace pgolf::cpu
