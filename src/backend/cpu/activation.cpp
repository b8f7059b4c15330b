#include "backend/cpu/activation.h"

#include <algorithm>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

template <typename T>
void leaky_relu_sq_forward(const T* pre, T* post, int64_t n, T slope) {
#pragma omp parallel for simd schedule(static) if (parallel_worth(n))
  for (int64_t i = 0; i < n; ++i) {
    // Branch-free (vectorizes; the sign of pre is unpredictable): max(x,0) + slope·min(x,0) is
    // exactly x for x > 0 and slope·x otherwise.
    const T a = std::max(pre[i], T(0)) + slope * std::min(pre[i], T(0));
    post[i] = a * a;
  }
}

template <typename T>
void leaky_relu_sq_backward(const T* dpost, const T* pre, T* dpre, int64_t n, T slope) {
  const T neg = slope * slope;
#pragma omp parallel for simd schedule(static) if (parallel_worth(n))
  for (int64_t i = 0; i < n; ++i)
    dpre[i] += dpost[i] * (T(2) * (std::max(pre[i], T(0)) + neg * std::min(pre[i], T(0))));
}

template void leaky_relu_sq_forward<float>(const float*, float*, int64_t, float);
template void leaky_relu_sq_forward<double>(const double*, double*, int64_t, double);
template void leaky_relu_sq_backward<float>(const float*, const float*, float*, int64_t, float);
template void leaky_relu_sq_backward<double>(const double*, const double*, double*, int64_t, double);

}  // namespace pgolf::cpu
