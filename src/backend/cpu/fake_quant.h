// Late-QAT fake quantization (SPEC §4.7): per-row int6 of a [rows, cols] weight, computed in fp32:
//   s_r = max(max_j |w_rj| / 31, 1/31),  Q(w)_rj = clamp(round_half_even(w_rj / s_r), −32, 31) · s_r.
// The training forward uses w̃ = w + stopgrad(Q(w) − w), whose value is Q(w) and whose gradient is
// the identity (straight-through): the caller feeds Q(w) to the matmul and sends dW to w.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

template <typename T>
void fake_quant_int6_rows(const T* w, T* out, int64_t rows, int64_t cols);

}  // namespace pgolf::cpu
