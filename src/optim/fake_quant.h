// Late-QAT fake quantization (SPEC §4.7): the straight-through forward weight of a CastedLinear once
// the late-QAT flag is set, w̃ = Q(w) (the backward passes the gradient through unchanged).
// Per row of W [rows, cols]: s = max(max_j |w_ij| / qmax, 1/qmax), Q(w) = clamp(round(w/s), −qmax−1, qmax)·s
// in fp32, qmax = 2^(bits−1) − 1 (bits = 6: s from rowmax/31, codes in [−32, 31]).
#pragma once

#include <cstdint>
#include <span>

namespace pgolf::optim {

void fake_quantize_rows(std::span<const float> w, int64_t rows, int64_t cols, int bits, std::span<float> out);

}  // namespace pgolf::optim
