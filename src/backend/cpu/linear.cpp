#include "backend/cpu/linear.h"

#include <cmath>
#include <type_traits>

#include "backend/cpu/gemm.h"
#include "core/half.h"

namespace pgolf::cpu {

template <typename T>
void linear_forward(const T* x, const T* W, T* y, int64_t N, int64_t in, int64_t out, bool accumulate) {
  gemm<T>(false, true, N, out, in, T(1), x, in, W, in, accumulate ? T(1) : T(0), y, out);
}

template <typename T>
void linear_backward(const T* dy, const T* x, const T* W, T* dx, T* dW, int64_t N, int64_t in, int64_t out) {
  if (dx) gemm<T>(false, false, N, in, out, T(1), dy, out, W, in, T(1), dx, in);
  if (dW) gemm<T>(true, false, out, in, N, T(1), dy, out, x, in, T(1), dW, in);
}

// A double first rounds to float; that can only move it onto a bf16 midpoint (low 16 bits 0x8000) from
// one side, so such a float is nudged one float ulp back towards the double: the bf16 rounding then sees
// the side the exact value lies on (no double rounding).
namespace {
float nearest_float_keeping_bf16_side(double x) {
  float f = static_cast<float>(x);
  if ((f32_bits(f) & 0xffffu) == 0x8000u && static_cast<double>(f) != x)
    f = std::nextafter(f, static_cast<double>(f) < x ? INFINITY : -INFINITY);
  return f;
}
}  // namespace

template <typename T>
void round_to_bf16(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) x[i] = pgolf::round_to_bf16(x[i]);
    else x[i] = static_cast<T>(pgolf::round_to_bf16(nearest_float_keeping_bf16_side(x[i])));
  }
}

template void linear_forward<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, bool);
template void linear_forward<double>(const double*, const double*, double*, int64_t, int64_t, int64_t, bool);
template void linear_backward<float>(const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                                     int64_t);
template void linear_backward<double>(const double*, const double*, const double*, double*, double*, int64_t, int64_t,
                                      int64_t);

template void round_to_bf16<float>(float*, int64_t);
template void round_to_bf16<double>(double*, int64_t);

}  // namespace pgolf::cpu
