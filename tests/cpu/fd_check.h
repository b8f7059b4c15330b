// Finite-difference gradient checks in fp64 for the CPU ops and the model.
//
// Central differences with step h on a loss L: error ≈ h²·|L'''|/6 (truncation) + ε·|L|/h (rounding).
// With h = 1e-5, ε = 2.2e-16 and |L|, |L'''| = O(10), both terms stay below ~1e-9, so an analytic
// gradient that agrees to 1e-6 (relative to max(1, |g|)) is right, and any real mistake (a missing
// term, a wrong sign, a dropped scale) shows up as O(1e-2) or more.
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
inline void expect_gradient_matches(const std::string& what, std::vector<double>& x, const std::vector<double>& analytic,
                                    const std::function<double()>& loss, std::vector<size_t> indices = {},
                                    double h = 1e-5, double tol = 1e-6) {
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
    const double err = std::fabs(numeric - analytic[i]) / std::max(1.0, std::fabs(numeric));
    if (err > worst) {
      worst = err;
      worst_i = i;
    }
  }
  EXPECT_LE(worst, tol) << what << ": worst gradient error at index " << worst_i << " (analytic " << analytic[worst_i]
                        << ")";
}

// Spread sample of indices of a tensor of n elements: up to `count` of them, deterministic.
inline std::vector<size_t> sample_indices(size_t n, size_t count, Rng& rng) {
  std::vector<size_t> out;
  if (n <= count) {
    for (size_t i = 0; i < n; ++i) out.push_back(i);
    return out;
  }
  for (size_t k = 0; k < count; ++k) out.push_back(static_cast<size_t>(rng.below(n)));
  return out;
}

inline double weighted_sum(const std::vector<double>& w, const std::vector<double>& y) {
  double s = 0;
  for (size_t i = 0; i < w.size(); ++i) s += w[i] * y[i];
  return s;
}

}  // namespace pgolf::test
