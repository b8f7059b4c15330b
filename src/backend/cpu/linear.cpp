#include "backend/cpu/linear.h"

#include "backend/cpu/gemm.h"

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

template void linear_forward<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, bool);
template void linear_forward<double>(const double*, const double*, double*, int64_t, int64_t, int64_t, bool);
template void linear_backward<float>(const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                                     int64_t);
template void linear_backward<double>(const double*, const double*, const double*, double*, double*, int64_t, int64_t,
                                      int64_t);

}  // namespace pgolf::cpu
