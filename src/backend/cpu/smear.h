// SmearGate v1 (SPEC §3.8): y_t = (1−g)⊙x_t + g⊙x_{t−1} with g = sigmoid(gate) [d], applied to the
// normed embedding; x_{−1} = 0 at position 0 of every row (the references' sequence or window).
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// x, y [rows·T, d] (must not alias).
template <typename T>
void smear_forward(const T* x, const T* gate, T* y, int64_t rows, int64_t seq_len, int64_t dim);

// dx += (1−g)⊙dy_t + g⊙dy_{t+1} (within the row); dgate += Σ_t dy_t⊙(x_{t−1} − x_t)·g(1−g)
// (dgate may be null).
template <typename T>
void smear_backward(const T* dy, const T* x, const T* gate, T* dx, T* dgate, int64_t rows, int64_t seq_len,
                    int64_t dim);

}  // namespace pgolf::cpu
