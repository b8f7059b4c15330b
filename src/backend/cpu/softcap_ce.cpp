#include "backend/cpu/softcap_ce.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/parallel.h"
#include "core/error.h"

namespace pgolf::cpu {

template <typename T>
void softcap_ce_forward(const T* z, T* capped, const int32_t* targets, T* losses, T* lse, int64_t N, int64_t V,
                        T cap) {
  if (targets)
    for (int64_t i = 0; i < N; ++i)
      PG_CHECK(targets[i] >= 0 && targets[i] < V, "cross-entropy: target {} at position {} is outside the vocab {}",
               targets[i], i, V);
#pragma omp parallel for schedule(static) if (parallel_worth(N * V))
  for (int64_t i = 0; i < N; ++i) {
    const T* zi = z + i * V;
    T* ci = capped + i * V;
    T mx = -cap;
    for (int64_t j = 0; j < V; ++j) {
      ci[j] = cap * std::tanh(zi[j] / cap);
      mx = std::max(mx, ci[j]);
    }
    if (!targets) continue;
    T sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(ci[j] - mx);
    lse[i] = mx + std::log(sum);
    losses[i] = lse[i] - ci[targets[i]];
  }
}

template <typename T>
void softcap_ce_backward(const T* capped, const T* lse, const int32_t* targets, const T* dloss, T* dz, int64_t N,
                         int64_t V, T cap) {
#pragma omp parallel for schedule(static) if (parallel_worth(N * V))
  for (int64_t i = 0; i < N; ++i) {
    const T* ci = capped + i * V;
    T* di = dz + i * V;
    const T w = dloss[i], l = lse[i];
    const int64_t t = targets[i];
    for (int64_t j = 0; j < V; ++j) {
      const T c = ci[j];
      const T th = c / cap;
      T g = std::exp(c - l);
      if (j == t) g -= T(1);
      di[j] = w * g * (T(1) - th * th);
    }
  }
}

template void softcap_ce_forward<float>(const float*, float*, const int32_t*, float*, float*, int64_t, int64_t, float);
template void softcap_ce_forward<double>(const double*, double*, const int32_t*, double*, double*, int64_t, int64_t,
                                         double);
template void softcap_ce_backward<float>(const float*, const float*, const int32_t*, const float*, float*, int64_t,
                                         int64_t, float);
template void softcap_ce_backward<double>(const double*, const double*, const int32_t*, const double*, double*,
                                          int64_t, int64_t, double);

}  // namespace pgolf::cpu
