// The MLP activations relu² and leaky(slope)² as one op (SPEC §3.6): post = leaky(pre)² with
// leaky(x) = x for x > 0, slope·x otherwise; relu² is slope 0.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

template <typename T>
void leaky_relu_sq_forward(const T* pre, T* post, int64_t n, T slope);

// dpre += dpost · f'(pre), f'(x) = 2x for x > 0 and 2·slope²·x otherwise (0.5x at slope 0.5).
template <typename T>
void leaky_relu_sq_backward(const T* dpost, const T* pre, T* dpre, int64_t n, T slope);

}  // namespace pgolf::cpu
