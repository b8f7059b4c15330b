#include "quant/quantile.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace pgolf {

std::vector<float> sorted_abs(std::span<const float> x) {
  std::vector<float> a(x.size());
  for (size_t i = 0; i < x.size(); ++i) a[i] = std::fabs(x[i]);
  std::sort(a.begin(), a.end());
  return a;
}

float torch_lerp(float start, float end, float weight) {
  // ATen: weight < 0.5 ? start + weight * (end - start) : end - (end - start) * (1 - weight),
  // each evaluated as one fused multiply-add.
  const float diff = end - start;
  if (std::fabs(weight) < 0.5f) return std::fmaf(weight, diff, start);
  return std::fmaf(weight - 1.0f, diff, end);
}

float quantile_sorted(std::span<const float> sorted, float q) {
  PG_CHECK(!sorted.empty(), "quantile of an empty tensor");
  PG_CHECK(q >= 0.0f && q <= 1.0f, "quantile q = {} is outside [0, 1]", q);
  const float rank = q * static_cast<float>(sorted.size() - 1);  // fp32 product, as in ATen
  const auto below = static_cast<size_t>(rank);
  const auto above = static_cast<size_t>(std::ceil(rank));
  const float weight = rank - static_cast<float>(below);
  return torch_lerp(sorted[below], sorted[above], weight);
}

}  // namespace pgolf
