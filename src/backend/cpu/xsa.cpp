#include "backend/cpu/xsa.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

namespace {
constexpr double kNormalizeEps = 1e-12;  // F.normalize's default eps

template <typename T>
T dot(const T* a, const T* b, int n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
}  // namespace

template <typename T>
void xsa_forward(const T* y_in, const T* v, T* y_out, int64_t N, int H, int Hkv, int Dh) {
  const int group = H / Hkv;
#pragma omp parallel if (parallel_worth(N * H * Dh))
  {
    std::vector<T> vhat(static_cast<size_t>(Dh));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int g = 0; g < Hkv; ++g) {
        const T* vg = v + (i * Hkv + g) * Dh;
        const T norm = std::max(std::sqrt(dot(vg, vg, Dh)), static_cast<T>(kNormalizeEps));
        for (int d = 0; d < Dh; ++d) vhat[d] = vg[d] / norm;
        for (int hq = 0; hq < group; ++hq) {
          const int64_t row = i * H + g * group + hq;
          const T* yi = y_in + row * Dh;
          T* yo = y_out + row * Dh;
          const T c = dot(yi, vhat.data(), Dh);
          for (int d = 0; d < Dh; ++d) yo[d] = yi[d] - c * vhat[d];
        }
      }
  }
}

// With c = y·v̂: dy_in = dy − (dy·v̂) v̂ and dv̂ = −(c·dy + (dy·v̂)·y), summed over the group's heads;
// then dv = (dv̂ − v̂ (v̂·dv̂)) / ‖v‖ when ‖v‖ > eps, else dv̂ / eps (the clamped branch is linear).
template <typename T>
void xsa_backward(const T* dy_out, const T* y_in, const T* v, T* dy_in, T* dv, int64_t N, int H, int Hkv, int Dh) {
  const int group = H / Hkv;
#pragma omp parallel if (parallel_worth(N * H * Dh))
  {
    std::vector<T> vhat(static_cast<size_t>(Dh)), dvhat(static_cast<size_t>(Dh));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int g = 0; g < Hkv; ++g) {
        const T* vg = v + (i * Hkv + g) * Dh;
        const T raw_norm = std::sqrt(dot(vg, vg, Dh));
        const bool clamped = raw_norm <= static_cast<T>(kNormalizeEps);
        const T norm = clamped ? static_cast<T>(kNormalizeEps) : raw_norm;
        for (int d = 0; d < Dh; ++d) vhat[d] = vg[d] / norm;
        std::fill(dvhat.begin(), dvhat.end(), T(0));
        for (int hq = 0; hq < group; ++hq) {
          const int64_t row = i * H + g * group + hq;
          const T* yi = y_in + row * Dh;
          const T* dyo = dy_out + row * Dh;
          T* dyi = dy_in + row * Dh;
          const T c = dot(yi, vhat.data(), Dh);
          const T e = dot(dyo, vhat.data(), Dh);
          for (int d = 0; d < Dh; ++d) {
            dyi[d] += dyo[d] - e * vhat[d];
            dvhat[d] -= c * dyo[d] + e * yi[d];
          }
        }
        T* dvg = dv + (i * Hkv + g) * Dh;
        if (clamped) {
          for (int d = 0; d < Dh; ++d) dvg[d] += dvhat[d] / norm;
        } else {
          const T vd = dot(vhat.data(), dvhat.data(), Dh);
          for (int d = 0; d < Dh; ++d) dvg[d] += (dvhat[d] - vhat[d] * vd) / norm;
        }
      }
  }
}

template void xsa_forward<float>(const float*, const float*, float*, int64_t, int, int, int);
template void xsa_forward<double>(const double*, const double*, double*, int64_t, int, int, int);
template void xsa_backward<float>(const float*, const float*, const float*, float*, float*, int64_t, int, int, int);
template void xsa_backward<double>(const double*, const double*, const double*, double*, double*, int64_t, int, int,
                                   int);

}  // namespace pgolf::cpu
