#include "backend/cpu/head_gate.h"

#include <cmath>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

template <typename T>
void head_gate_forward(const T* y_in, const T* logits, const T* bias, T* gate, T* y_out, int64_t N, int H, int Dh) {
#pragma omp parallel for schedule(static) if (parallel_worth(N * H * Dh))
  for (int64_t r = 0; r < N * H; ++r) {
    const T z = logits[r] + (bias ? bias[r % H] : T(0));
    const T g = T(1) / (T(1) + std::exp(-z));
    gate[r] = g;
    for (int d = 0; d < Dh; ++d) y_out[r * Dh + d] = y_in[r * Dh + d] * g;
  }
}

template <typename T>
void head_gate_backward(const T* dy_out, const T* y_in, const T* gate, T* dy_in, T* dlogits, T* dbias, int64_t N,
                        int H, int Dh) {
#pragma omp parallel for schedule(static) if (parallel_worth(N * H * Dh))
  for (int64_t r = 0; r < N * H; ++r) {
    const T g = gate[r];
    T dg = 0;
    for (int d = 0; d < Dh; ++d) {
      dg += dy_out[r * Dh + d] * y_in[r * Dh + d];
      dy_in[r * Dh + d] += dy_out[r * Dh + d] * g;
    }
    dlogits[r] += dg * g * (T(1) - g);
  }
  if (!dbias) return;
  // The bias gradient sums the logit gradient over tokens (serial: a fixed order).
  for (int64_t i = 0; i < N; ++i)
    for (int h = 0; h < H; ++h) {
      const int64_t r = i * H + h;
      T dg = 0;
      for (int d = 0; d < Dh; ++d) dg += dy_out[r * Dh + d] * y_in[r * Dh + d];
      dbias[h] += dg * gate[r] * (T(1) - gate[r]);
    }
}

template void head_gate_forward<float>(const float*, const float*, const float*, float*, float*, int64_t, int, int);
template void head_gate_forward<double>(const double*, const double*, const double*, double*, double*, int64_t, int,
                                        int);
template void head_gate_backward<float>(const float*, const float*, const float*, float*, float*, float*, int64_t, int,
                                        int);
template void head_gate_backward<double>(const double*, const double*, const double*, double*, double*, double*,
                                         int64_t, int, int);

}  // namespace pgolf::cpu
