#include "backend/cpu/mixing.h"

#include <cmath>
#include <omp.h>
#include <vector>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

namespace {

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Column sums Σ_i f(i, j) over N rows for each of d columns, added into out[j]. Each thread owns a
// set of columns, so the order of the sum over rows is the serial one whatever the thread count.
template <typename T, typename F>
void add_column_sums(int64_t N, int64_t d, T* out, F f) {
#pragma omp parallel if (parallel_worth(N * d))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t j0 = d * t / nt, j1 = d * (t + 1) / nt;
    std::vector<T> acc(static_cast<size_t>(j1 - j0), T(0));
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += f(i, j);
    for (int64_t j = j0; j < j1; ++j) out[j] += acc[j - j0];
  }
}

// Σ_i f(i) over n values (serial: a fixed order).
template <typename T, typename F>
T total(int64_t n, F f) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += f(i);
  return acc;
}

}  // namespace

template <typename T>
void resid_mix_forward(const T* x, const T* x0, const T* mix, T* out, int64_t N, int64_t d) {
  const T* m0 = mix;
  const T* m1 = mix + d;
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = m0[j] * x[i * d + j] + m1[j] * x0[i * d + j];
}

template <typename T>
void resid_mix_backward(const T* dout, const T* x, const T* x0, const T* mix, T* dx, T* dx0, T* dmix, int64_t N,
                        int64_t d) {
  const T* m0 = mix;
  const T* m1 = mix + d;
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) {
      dx[i * d + j] += m0[j] * dout[i * d + j];
      dx0[i * d + j] += m1[j] * dout[i * d + j];
    }
  if (!dmix) return;
  add_column_sums<T>(N, d, dmix, [&](int64_t i, int64_t j) { return dout[i * d + j] * x[i * d + j]; });
  add_column_sums<T>(N, d, dmix + d, [&](int64_t i, int64_t j) { return dout[i * d + j] * x0[i * d + j]; });
}

template <typename T>
void branch_add_forward(const T* x, const T* a, const T* scale, const T* gate, T* out, int64_t N, int64_t d) {
  std::vector<T> g(static_cast<size_t>(d), T(1));
  if (gate)
    for (int64_t j = 0; j < d; ++j) g[j] = sigmoid(gate[j]);
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = (x ? x[i * d + j] : T(0)) + scale[j] * (g[j] * a[i * d + j]);
}

template <typename T>
void branch_add_backward(const T* dout, const T* a, const T* scale, const T* gate, T* da, T* dscale, T* dgate,
                         int64_t N, int64_t d) {
  std::vector<T> g(static_cast<size_t>(d), T(1));
  if (gate)
    for (int64_t j = 0; j < d; ++j) g[j] = sigmoid(gate[j]);
  if (da) {
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < d; ++j) da[i * d + j] += scale[j] * g[j] * dout[i * d + j];
  }
  if (!dscale && !(gate && dgate)) return;
  // Σ_i dout⊙a per feature, then the chain rule through scale⊙g.
  std::vector<T> sum(static_cast<size_t>(d), T(0));
  add_column_sums<T>(N, d, sum.data(), [&](int64_t i, int64_t j) { return dout[i * d + j] * a[i * d + j]; });
  for (int64_t j = 0; j < d; ++j) {
    if (dscale) dscale[j] += sum[j] * g[j];
    if (gate && dgate) dgate[j] += sum[j] * scale[j] * g[j] * (T(1) - g[j]);
  }
}

template <typename T>
void skip_add_forward(const T* x, const T* s, const T* w, const T* gate, T* out, int64_t N, int64_t d) {
  std::vector<T> g(static_cast<size_t>(d));
  if (gate)
    for (int64_t j = 0; j < d; ++j) g[j] = sigmoid(gate[j]);
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) {
      const T ws = w[j] * s[i * d + j];
      out[i * d + j] = gate ? ws + g[j] * (x[i * d + j] - ws) : x[i * d + j] + ws;
    }
}

template <typename T>
void skip_add_backward(const T* dout, const T* x, const T* s, const T* w, const T* gate, T* dx, T* ds, T* dw, T* dgate,
                       int64_t N, int64_t d) {
  // d out/d x = g, d out/d(w⊙s) = 1 − g (g = 1 and 1 without a gate, as out = x + w⊙s).
  std::vector<T> g(static_cast<size_t>(d), T(1)), keep(static_cast<size_t>(d), T(1));
  if (gate)
    for (int64_t j = 0; j < d; ++j) {
      g[j] = sigmoid(gate[j]);
      keep[j] = T(1) - g[j];
    }
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) {
      dx[i * d + j] += g[j] * dout[i * d + j];
      ds[i * d + j] += keep[j] * w[j] * dout[i * d + j];
    }
  if (dw)
    add_column_sums<T>(N, d, dw, [&](int64_t i, int64_t j) { return dout[i * d + j] * keep[j] * s[i * d + j]; });
  if (gate && dgate) {
    std::vector<T> sum(static_cast<size_t>(d), T(0));
    add_column_sums<T>(N, d, sum.data(),
                       [&](int64_t i, int64_t j) { return dout[i * d + j] * (x[i * d + j] - w[j] * s[i * d + j]); });
    for (int64_t j = 0; j < d; ++j) dgate[j] += sum[j] * g[j] * (T(1) - g[j]);
  }
}

template <typename T>
void lane_update_forward(const T* lane0, const T* lane1, const T* a, const T* m, const T* resid, const T* post,
                         T* out0, T* out1, int64_t N, int64_t d) {
  const T r0 = resid[0], r1 = resid[1], p00 = post[0], p01 = post[1], p10 = post[2], p11 = post[3];
#pragma omp parallel for schedule(static) if (parallel_worth(N * d))
  for (int64_t k = 0; k < N * d; ++k) {
    out0[k] = r0 * lane0[k] + p00 * a[k] + p10 * m[k];
    out1[k] = r1 * lane1[k] + p01 * a[k] + p11 * m[k];
  }
}

template <typename T>
void lane_update_backward(const T* dout0, const T* dout1, const T* lane0, const T* lane1, const T* a, const T* m,
                          const T* resid, const T* post, T* dlane0, T* dlane1, T* da, T* dm, T* dresid, T* dpost,
                          int64_t N, int64_t d) {
  const T r0 = resid[0], r1 = resid[1], p00 = post[0], p01 = post[1], p10 = post[2], p11 = post[3];
  const int64_t n = N * d;
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t k = 0; k < n; ++k) {
    dlane0[k] += r0 * dout0[k];
    dlane1[k] += r1 * dout1[k];
    da[k] += p00 * dout0[k] + p01 * dout1[k];
    dm[k] += p10 * dout0[k] + p11 * dout1[k];
  }
  if (dresid) {
    dresid[0] += total<T>(n, [&](int64_t k) { return dout0[k] * lane0[k]; });
    dresid[1] += total<T>(n, [&](int64_t k) { return dout1[k] * lane1[k]; });
  }
  if (dpost) {
    dpost[0] += total<T>(n, [&](int64_t k) { return dout0[k] * a[k]; });
    dpost[1] += total<T>(n, [&](int64_t k) { return dout1[k] * a[k]; });
    dpost[2] += total<T>(n, [&](int64_t k) { return dout0[k] * m[k]; });
    dpost[3] += total<T>(n, [&](int64_t k) { return dout1[k] * m[k]; });
  }
}

template <typename T>
void value_mix_forward(const T* v, const T* v0, const T* lambda, T* out, int64_t n) {
  const T l0 = lambda[0], l1 = lambda[1];
  if (v0) {
    for (int64_t k = 0; k < n; ++k) out[k] = l0 * v0[k] + l1 * v[k];
  } else {
    const T s = l0 + l1;
    for (int64_t k = 0; k < n; ++k) out[k] = v[k] * s;
  }
}

template <typename T>
void value_mix_backward(const T* dout, const T* v, const T* v0, const T* lambda, T* dv, T* dv0, T* dlambda,
                        int64_t n) {
  const T l0 = lambda[0], l1 = lambda[1];
  if (v0) {
    for (int64_t k = 0; k < n; ++k) {
      dv[k] += l1 * dout[k];
      dv0[k] += l0 * dout[k];
    }
    if (dlambda) {
      dlambda[0] += total<T>(n, [&](int64_t k) { return dout[k] * v0[k]; });
      dlambda[1] += total<T>(n, [&](int64_t k) { return dout[k] * v[k]; });
    }
  } else {
    const T s = l0 + l1;
    for (int64_t k = 0; k < n; ++k) dv[k] += s * dout[k];
    if (dlambda) {
      const T g = total<T>(n, [&](int64_t k) { return dout[k] * v[k]; });
      dlambda[0] += g;
      dlambda[1] += g;
    }
  }
}

template <typename T>
void head_scale_forward(const T* x, const T* gain, T* out, int64_t N, int H, int Dh) {
#pragma omp parallel for schedule(static) if (parallel_worth(N * H * Dh))
  for (int64_t r = 0; r < N * H; ++r) {
    const T g = gain[r % H];
    for (int d = 0; d < Dh; ++d) out[r * Dh + d] = x[r * Dh + d] * g;
  }
}

template <typename T>
void head_scale_backward(const T* dout, const T* x, const T* gain, T* dx, T* dgain, int64_t N, int H, int Dh) {
  if (dx) {
#pragma omp parallel for schedule(static) if (parallel_worth(N * H * Dh))
    for (int64_t r = 0; r < N * H; ++r) {
      const T g = gain[r % H];
      for (int d = 0; d < Dh; ++d) dx[r * Dh + d] += g * dout[r * Dh + d];
    }
  }
  if (dgain)
    for (int h = 0; h < H; ++h)
      dgain[h] += total<T>(N * Dh, [&](int64_t k) {
        const int64_t off = ((k / Dh) * H + h) * Dh + k % Dh;
        return dout[off] * x[off];
      });
}

template <typename T>
void scaled_add_forward(const T* x, T s, T* y, int64_t n, bool accumulate) {
  if (accumulate)
    for (int64_t k = 0; k < n; ++k) y[k] += s * x[k];
  else
    for (int64_t k = 0; k < n; ++k) y[k] = s * x[k];
}

template <typename T>
void scaled_add_backward(const T* dy, const T* x, T s, T* dx, T* ds, int64_t n) {
  if (dx)
    for (int64_t k = 0; k < n; ++k) dx[k] += s * dy[k];
  if (ds) *ds += total<T>(n, [&](int64_t k) { return dy[k] * x[k]; });
}

#define PG_MIXING_INSTANTIATE(T)                                                                                   \
  template void resid_mix_forward<T>(const T*, const T*, const T*, T*, int64_t, int64_t);                          \
  template void resid_mix_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t);        \
  template void branch_add_forward<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t);                \
  template void branch_add_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t);       \
  template void skip_add_forward<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t);                  \
  template void skip_add_backward<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, T*, int64_t,     \
                                     int64_t);                                                                     \
  template void lane_update_forward<T>(const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, int64_t, \
                                       int64_t);                                                                   \
  template void lane_update_backward<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,       \
                                        const T*, T*, T*, T*, T*, T*, T*, int64_t, int64_t);                       \
  template void value_mix_forward<T>(const T*, const T*, const T*, T*, int64_t);                                   \
  template void value_mix_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t);                \
  template void head_scale_forward<T>(const T*, const T*, T*, int64_t, int, int);                                  \
  template void head_scale_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int, int);                    \
  template void scaled_add_forward<T>(const T*, T, T*, int64_t, bool);                                             \
  template void scaled_add_backward<T>(const T*, const T*, T, T*, T*, int64_t);

PG_MIXING_INSTANTIATE(float)
PG_MIXING_INSTANTIATE(double)

}  // namespace pgolf::cpu
