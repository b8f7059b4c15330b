#include "backend/cpu/rmsnorm.h"

#include <cmath>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

template <typename T>
void rmsnorm_forward(const T* x, T* y, T* rstd, int64_t rows, int64_t dim, T scale) {
  const T eps = static_cast<T>(kRmsNormEps);
#pragma omp parallel for schedule(static) if (parallel_worth(rows * dim))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < dim; ++j) ss += xr[j] * xr[j];
    const T inv = T(1) / std::sqrt(ss / static_cast<T>(dim) + eps);
    rstd[r] = inv;
    T* yr = y + r * dim;
    // (x·r)·s in this order, as the references compute norm(x) * ln_scale.
    for (int64_t j = 0; j < dim; ++j) yr[j] = (xr[j] * inv) * scale;
  }
}

// y_i = s·x_i·r with r = (mean(x²)+eps)^(-1/2), dr/dx_j = -r³ x_j / dim, so
// dx_i = s·r·(dy_i - x_i · r² · (Σ_j dy_j x_j) / dim).
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* rstd, T* dx, int64_t rows, int64_t dim, T scale) {
#pragma omp parallel for schedule(static) if (parallel_worth(rows * dim))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < dim; ++j) dot += dyr[j] * xr[j];
    const T inv = rstd[r];
    const T c = inv * inv * dot / static_cast<T>(dim);
    T* dxr = dx + r * dim;
    for (int64_t j = 0; j < dim; ++j) dxr[j] += scale * inv * (dyr[j] - xr[j] * c);
  }
}

template void rmsnorm_forward<float>(const float*, float*, float*, int64_t, int64_t, float);
template void rmsnorm_forward<double>(const double*, double*, double*, int64_t, int64_t, double);
template void rmsnorm_backward<float>(const float*, const float*, const float*, float*, int64_t, int64_t, float);
template void rmsnorm_backward<double>(const double*, const double*, const double*, double*, int64_t, int64_t,
                                       double);

}  // namespace pgolf::cpu
