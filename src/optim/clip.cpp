#include "optim/clip.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "optim/update_math.h"

namespace pgolf::optim {

double global_l2_norm(std::span<const float> values) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n = static_cast<int64_t>(values.size());
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0.0;
    for (int64_t i = c * kChunk, end = std::min(n, (c + 1) * kChunk); i < end; ++i)
      s += static_cast<double>(values[i]) * values[i];
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

float clip_coefficient(double total_norm, double max_norm) {
  PG_CHECK(max_norm > 0.0, "clip_coefficient: max_norm must be positive, got {}", max_norm);
  return clip_coefficient_f32(static_cast<float>(total_norm), static_cast<float>(max_norm));
}

double clip_grad_norm(std::span<float> grads, double max_norm) {
  const double norm = global_l2_norm(grads);
  PG_CHECK(std::isfinite(norm), "the gradient norm is {} (a NaN or infinite gradient)", norm);
  if (max_norm <= 0.0) return norm;
  const float coef = clip_coefficient(norm, max_norm);
  const int64_t n = static_cast<int64_t>(grads.size());
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) grads[i] *= coef;
  return norm;
}

}  // namespace pgolf::optim
