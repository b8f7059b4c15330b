// Finite-difference gradient checks in fp64 for the CPU ops and the model.
//
// Central differences with step h on a loss L: error ≈ h²·|L'''|/6 (truncation) + ε·|L|/h (rounding).
// With h = 1e-5, ε = 2.2e-16 and |L|, |L'''| = O(10), both terms stay below ~1e-9. An analytic
// gradient g passes when |g − g_fd| ≤ abs_tol + rel_tol·|g_fd| with abs_tol = 1e-7, rel_tol = 1e-5:
// 100x above the difference noise, far below what a real mistake (a missing term, a wrong sign, a
// dropped scale) produces.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/rng.h"

namespace pgolf::test {

inline std::vector<double> random_vector(Rng& rng, size_t n, double scale = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

// Compares analytic[i] with the central difference of `loss` in x[i] for the listed indices
// (all when empty). `loss` reads x (which is perturbed in place and restored).
template <typename Vec>
void expect_gradient_matches(const std::string& what, Vec& x, const std::vector<double>& analytic,
                             const std::function<double()>& loss, std::vector<size_t> indices = {},
                             double abs_tol = 1e-7, double rel_tol = 1e-5, double h = 1e-5) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  if (indices.empty())
    for (size_t i = 0; i < x.size(); ++i) indices.push_back(i);
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i : indices) {
    const double keep = x[i];
    x[i] = keep + h;
    const double lp = loss();
    x[i] = keep - h;
    const double lm = loss();
    x[i] = keep;
    const double numeric = (lp - lm) / (2 * h);
    const double err = std::fabs(numeric - analytic[i]) / (abs_tol + rel_tol * std::fabs(numeric));
    if (err > worst) {
      worst = err;
      worst_i = i;
    }
  }
  EXPECT_LE(worst, 1.0) << what << ": worst gradient error (in units of the tolerance) at index " << worst_i
                        << " (analytic " << analytic[worst_i] << ")";
}

// Indices to check in a tensor of n elements: all of them when n <= 2·count, else the `count`
// largest |analytic| entries (where a wrong gradient shows) plus `count` random ones (deterministic).
inline std::vector<size_t> sample_indices(const std::vector<double>& analytic, size_t count, Rng& rng) {
  const size_t n = analytic.size();
  std::vector<size_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = i;
  if (n <= 2 * count) return out;
  std::partial_sort(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(count), out.end(),
                    [&](size_t a, size_t b) { return std::fabs(analytic[a]) > std::fabs(analytic[b]); });
  out.resize(count);
  for (size_t k = 0; k < count; ++k) out.push_back(static_cast<size_t>(rng.below(n)));
  return out;
}

inline double weighted_sum(const std::vector<double>& w, const std::vector<double>& y) {
  double s = 0;
  for (size_t i = 0; i < w.size(); ++i) s += w[i] * y[i];
  return s;
}

}  // namespace pgolf::test
