#include "backend/cpu/rope.h"

#include <cmath>

#include "backend/cpu/parallel.h"
#include "core/error.h"

namespace pgolf::cpu {

RopeTable make_rope_table(double base, int rope_dims, int max_positions) {
  PG_CHECK(rope_dims > 0 && rope_dims % 2 == 0, "rope: rope_dims {} must be positive and even", rope_dims);
  RopeTable t;
  t.rope_dims = rope_dims;
  t.max_positions = max_positions;
  const int half = rope_dims / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  const float base_f = static_cast<float>(base);
  for (int j = 0; j < half; ++j) {
    // torch: 1.0 / (base ** (arange(0, rd, 2, float32) / rd)), all in fp32.
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(rope_dims);
    inv_freq[static_cast<size_t>(j)] = 1.0f / std::pow(base_f, exponent);
  }
  t.cos.resize(static_cast<size_t>(max_positions) * half);
  t.sin.resize(t.cos.size());
  for (int p = 0; p < max_positions; ++p)
    for (int j = 0; j < half; ++j) {
      const float angle = static_cast<float>(p) * inv_freq[static_cast<size_t>(j)];
      t.cos[static_cast<size_t>(p) * half + j] = std::cos(angle);
      t.sin[static_cast<size_t>(p) * half + j] = std::sin(angle);
    }
  return t;
}

namespace {

// Applies [c s; -s c] (forward) or its transpose (backward) to every head of every token.
template <typename T>
void rotate(T* x, const int32_t* positions, const RopeTable& table, int64_t N, int heads, int head_dim, bool transpose) {
  const int half = table.rope_dims / 2;
  PG_CHECK(table.rope_dims <= head_dim, "rope: rope_dims {} > head_dim {}", table.rope_dims, head_dim);
  for (int64_t i = 0; i < N; ++i)
    PG_CHECK(positions[i] >= 0 && positions[i] < table.max_positions,
             "rope: position {} of token {} is outside the table (max {})", positions[i], i, table.max_positions);
  const T sign = transpose ? T(-1) : T(1);
#pragma omp parallel for schedule(static) if (parallel_worth(N * heads * head_dim))
  for (int64_t i = 0; i < N; ++i) {
    const float* c = table.cos.data() + static_cast<int64_t>(positions[i]) * half;
    const float* s = table.sin.data() + static_cast<int64_t>(positions[i]) * half;
    for (int h = 0; h < heads; ++h) {
      T* v = x + (i * heads + h) * head_dim;
      for (int j = 0; j < half; ++j) {
        const T cj = static_cast<T>(c[j]), sj = sign * static_cast<T>(s[j]);
        const T a = v[j], b = v[j + half];
        v[j] = a * cj + b * sj;
        v[j + half] = a * (-sj) + b * cj;
      }
    }
  }
}

}  // namespace

template <typename T>
void rope_forward(T* x, const int32_t* positions, const RopeTable& table, int64_t N, int heads, int head_dim) {
  rotate(x, positions, table, N, heads, head_dim, false);
}

template <typename T>
void rope_backward(T* dx, const int32_t* positions, const RopeTable& table, int64_t N, int heads, int head_dim) {
  rotate(dx, positions, table, N, heads, head_dim, true);
}

template void rope_forward<float>(float*, const int32_t*, const RopeTable&, int64_t, int, int);
template void rope_forward<double>(double*, const int32_t*, const RopeTable&, int64_t, int, int);
template void rope_backward<float>(float*, const int32_t*, const RopeTable&, int64_t, int, int);
template void rope_backward<double>(double*, const int32_t*, const RopeTable&, int64_t, int, int);

}  // namespace pgolf::cpu
