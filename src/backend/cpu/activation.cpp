#include "backend/cpu/activation.h"
#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

template <typename T>
void leaky_relu_sq_forward(const T* pre, T* post, int64_t n, T slope) {
#pragma omp parallel for simd schedule(static) if (parallel_worth(n))
  for (int64_t i = 0; i < n; ++i) {
    const T a = pre[i] > T(0) ? pre[i] : slope * pre[i];
    post[i] = a * a;
  }
}

template <typename T>
void leaky_relu_sq_backward(const T* dpost, const T* pre, T* dpre, int64_t n, T slope) {
  const T neg = T(2) * slope * slope;
#pragma omp parallel for simd schedule(static) if (parallel_worth(n))
  for (int64_t i = 0; i < n; ++i) dpre[i] += dpost[i] * (pre[i] > T(0) ? T(2) * pre[i] : neg * pre[i]);
}

template void leaky_relu_sq_forward<float>(const float*, float*, int64_t, float);
template void leaky_relu_sq_forward<double>(const double*, double*, int64_t, double);
template void leaky_relu_sq_backward<float>(const float*, const float*, float*, int64_t, float);
template void leaky_relu_sq_backward<double>(const double*, const double*, double*, int64_t, double);

}  // namespace pgolf::cpu
