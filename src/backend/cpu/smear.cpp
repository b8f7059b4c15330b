#include "backend/cpu/smear.h"

#include <cmath>
#include <vector>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

namespace {
template <typename T>
std::vector<T> sigmoid_of(const T* gate, int64_t dim) {
  std::vector<T> g(static_cast<size_t>(dim));
  for (int64_t j = 0; j < dim; ++j) g[j] = T(1) / (T(1) + std::exp(-gate[j]));
  return g;
}
}  // namespace

template <typename T>
void smear_forward(const T* x, const T* gate, T* y, int64_t rows, int64_t seq_len, int64_t dim) {
  const std::vector<T> g = sigmoid_of(gate, dim);
#pragma omp parallel for schedule(static) if (parallel_worth(rows * seq_len * dim))
  for (int64_t i = 0; i < rows * seq_len; ++i) {
    const bool first = i % seq_len == 0;
    for (int64_t j = 0; j < dim; ++j) {
      const T prev = first ? T(0) : x[(i - 1) * dim + j];
      y[i * dim + j] = (T(1) - g[j]) * x[i * dim + j] + g[j] * prev;
    }
  }
}

template <typename T>
void smear_backward(const T* dy, const T* x, const T* gate, T* dx, T* dgate, int64_t rows, int64_t seq_len,
                    int64_t dim) {
  const std::vector<T> g = sigmoid_of(gate, dim);
  const int64_t N = rows * seq_len;
#pragma omp parallel for schedule(static) if (parallel_worth(N * dim))
  for (int64_t i = 0; i < N; ++i) {
    const bool last = (i + 1) % seq_len == 0;
    for (int64_t j = 0; j < dim; ++j) {
      const T next = last ? T(0) : dy[(i + 1) * dim + j];
      dx[i * dim + j] += (T(1) - g[j]) * dy[i * dim + j] + g[j] * next;
    }
  }
  if (!dgate) return;
  // The gate gradient is a reduction over tokens: serial per column, so the sum order is fixed.
#pragma omp parallel for schedule(static) if (parallel_worth(N * dim))
  for (int64_t j = 0; j < dim; ++j) {
    T acc = 0;
    for (int64_t i = 0; i < N; ++i) {
      const T prev = i % seq_len == 0 ? T(0) : x[(i - 1) * dim + j];
      acc += dy[i * dim + j] * (prev - x[i * dim + j]);
    }
    dgate[j] += acc * g[j] * (T(1) - g[j]);
  }
}

template void smear_forward<float>(const float*, const float*, float*, int64_t, int64_t, int64_t);
template void smear_forward<double>(const double*, const double*, double*, int64_t, int64_t, int64_t);
template void smear_backward<float>(const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                                    int64_t);
template void smear_backward<double>(const double*, const double*, const double*, double*, double*, int64_t, int64_t,
                                     int64_t);

}  // namespace pgolf::cpu
