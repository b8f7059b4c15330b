// Linear layer without bias, y = x Wᵀ with W [out, in] (the reference CastedLinear / F.linear).
// Backward ops accumulate into their outputs (dx, dW): a tensor read by several branches sums the
// gradients of all of them, and the caller zeroes once.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// y[N,out] = x[N,in] Wᵀ, or y += x Wᵀ when `accumulate`.
template <typename T>
void linear_forward(const T* x, const T* W, T* y, int64_t N, int64_t in, int64_t out, bool accumulate = false);

// dx[N,in] += dy W and dW[out,in] += dyᵀ x; either output may be null (not needed / frozen).
template <typename T>
void linear_backward(const T* dy, const T* x, const T* W, T* dx, T* dW, int64_t N, int64_t in, int64_t out);

// x[i] ← x[i] rounded to the nearest bf16 value (ties to even, as one rounding from the exact value even
// for doubles): the dtype of a linear's input gradient under the references' bf16 autocast.
template <typename T>
void round_to_bf16(T* x, int64_t n);

}  // namespace pgolf::cpu
