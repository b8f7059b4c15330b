// Newton–Schulz orthogonalisation (SPEC §4.2): against an independent fp64 implementation, on
// diagonal inputs where every GEMM is exact (so the bf16 rounding points can be checked bit for
// bit), and the orientation / batching invariances.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/half.h"
#include "core/rng.h"
#include "optim/newton_schulz.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

// Straightforward NS5 in precision T on a wide [n, m] matrix (n <= m), triple loops.
template <typename T>
std::vector<T> reference_ns(const std::vector<float>& g, int n, int m, int steps, NsForm form) {
  std::vector<T> x(g.begin(), g.end());
  T ss = 0;
  for (T v : x) ss += v * v;
  const T denom = std::sqrt(ss) + static_cast<T>(kNsEps);
  for (T& v : x) v /= denom;
  const T a = static_cast<T>(kNsA), b = static_cast<T>(kNsB), c = static_cast<T>(kNsC);
  std::vector<T> A(n * n), M(n * n), B(n * n), next(n * m);
  for (int it = 0; it < steps; ++it) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        T s = 0;
        for (int k = 0; k < m; ++k) s += x[i * m + k] * x[j * m + k];
        A[i * n + j] = s;
      }
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        T s = 0;
        for (int k = 0; k < n; ++k)
          s += form == NsForm::ScaleThenSquare ? (c * A[i * n + k]) * A[k * n + j] : A[i * n + k] * A[k * n + j];
        M[i * n + j] = form == NsForm::ScaleThenSquare ? s : c * s;
      }
    for (int i = 0; i < n * n; ++i) B[i] = b * A[i] + M[i];
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < m; ++j) {
        T s = 0;
        for (int k = 0; k < n; ++k) s += B[i * n + k] * x[k * m + j];
        next[i * m + j] = a * x[i * m + j] + s;
      }
    x = next;
  }
  return x;
}

std::vector<float> random_matrix(int rows, int cols, uint64_t seed) {
  std::vector<float> g(static_cast<size_t>(rows) * cols);
  Rng rng(seed);
  for (float& v : g) v = static_cast<float>(rng.normal());
  return g;
}

// ENGINEERING §4: the fp32 result may differ from fp64 by at most k times what a naive fp32
// computation of the same thing differs by (k = 2 here; OpenBLAS blocks its sums differently).
TEST(NewtonSchulz, Fp32IsAsAccurateAsANaiveFp32Computation) {
  for (NsForm form : {NsForm::ScaleThenSquare, NsForm::SquareThenScale}) {
    const int n = 24, m = 72;
    const std::vector<float> g = random_matrix(n, m, 1);
    std::vector<float> ours = g;
    newton_schulz_batched(ours, 1, n, m, 5, MuonNumerics::F32, form);
    const auto exact = reference_ns<double>(g, n, m, 5, form);
    const auto naive = reference_ns<float>(g, n, m, 5, form);
    double err = 0.0, naive_err = 0.0;
    for (size_t i = 0; i < exact.size(); ++i) {
      err = std::max(err, std::fabs(ours[i] - exact[i]));
      naive_err = std::max(naive_err, std::fabs(naive[i] - exact[i]));
    }
    EXPECT_GT(naive_err, 0.0);
    EXPECT_LE(err, 2.0 * naive_err) << "ours " << err << ", naive fp32 " << naive_err;
  }
}

// The output is close to orthogonal: X·Xᵀ ≈ I within the quintic's band (singular values end up in
// about [0.7, 1.2] after five steps, so X·Xᵀ's eigenvalues lie in about [0.5, 1.45]).
TEST(NewtonSchulz, OutputIsNearlyOrthogonal) {
  const int n = 32, m = 96;
  std::vector<float> x = random_matrix(n, m, 2);
  newton_schulz_batched(x, 1, n, m, 5, MuonNumerics::F32, NsForm::ScaleThenSquare);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0.0;
      for (int k = 0; k < m; ++k) s += static_cast<double>(x[i * m + k]) * x[j * m + k];
      if (i == j) {
        EXPECT_GT(s, 0.5);
        EXPECT_LT(s, 1.45);
      } else {
        EXPECT_LT(std::fabs(s), 0.5);
      }
    }
}

// On a diagonal matrix every GEMM output element is a single product, exact in fp32, so the bf16
// emulation must equal this scalar recurrence with a bf16 rounding after every tensor op, bit for bit.
TEST(NewtonSchulz, Bf16RoundsAfterEveryTensorOp) {
  const int rows = 3, cols = 5;
  const float d[rows] = {0.9f, -0.35f, 0.0125f};
  for (NsForm form : {NsForm::ScaleThenSquare, NsForm::SquareThenScale}) {
    std::vector<float> g(rows * cols, 0.0f);
    for (int i = 0; i < rows; ++i) g[i * cols + i] = d[i];
    newton_schulz_batched(g, 1, rows, cols, 5, MuonNumerics::BF16, form);

    auto r = [](float v) { return round_to_bf16(v); };
    const float a = static_cast<float>(kNsA), b = static_cast<float>(kNsB), c = static_cast<float>(kNsC);
    float x[rows];
    double ss = 0.0;
    for (int i = 0; i < rows; ++i) {
      x[i] = r(d[i]);
      ss += static_cast<double>(x[i]) * x[i];
    }
    const float denom = r(r(static_cast<float>(std::sqrt(ss))) + static_cast<float>(kNsEps));
    for (float& v : x) v = r(v / denom);
    for (int it = 0; it < 5; ++it)
      for (float& v : x) {
        const float A = r(v * v);
        const float M = form == NsForm::ScaleThenSquare ? r(r(c * A) * A) : r(c * r(A * A));
        const float B = r(r(b * A) + M);
        v = r(r(a * v) + r(B * v));
      }
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j) EXPECT_EQ(g[i * cols + j], i == j ? x[i] : 0.0f) << i << "," << j;
  }
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(NewtonSchulz, TallMatricesAreOrthogonalisedInTheWideOrientation) {
  const int rows = 40, cols = 12;
  for (MuonNumerics num : {MuonNumerics::F32, MuonNumerics::BF16}) {
    std::vector<float> tall = random_matrix(rows, cols, 3);
    std::vector<float> wide(tall.size());
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j) wide[j * rows + i] = tall[i * cols + j];
    newton_schulz_batched(tall, 1, rows, cols, 5, num, NsForm::ScaleThenSquare);
    newton_schulz_batched(wide, 1, cols, rows, 5, num, NsForm::ScaleThenSquare);
    std::vector<float> back(tall.size());
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j) back[i * cols + j] = wide[j * rows + i];
    EXPECT_TRUE(same_bits(tall, back));
  }
}

TEST(NewtonSchulz, BatchedEqualsOneByOne) {
  const int count = 3, rows = 16, cols = 48;
  std::vector<float> batch = random_matrix(count * rows, cols, 4);
  std::vector<float> single(batch);
  newton_schulz_batched(batch, count, rows, cols, 5, MuonNumerics::BF16, NsForm::SquareThenScale);
  for (int s = 0; s < count; ++s)
    newton_schulz_batched(std::span<float>(single).subspan(s * rows * cols, rows * cols), 1, rows, cols, 5,
                          MuonNumerics::BF16, NsForm::SquareThenScale);
  EXPECT_TRUE(same_bits(batch, single));
  for (float v : batch) EXPECT_EQ(v, round_to_bf16(v));  // every output is a bf16 value
}

}  // namespace
