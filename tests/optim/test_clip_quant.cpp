// Gradient clipping (SPEC §4.5) and the late-QAT fake quantizer (SPEC §4.7).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "optim/clip.h"
#include "optim/fake_quant.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

TEST(Clip, NormAndCoefficient) {
  std::vector<float> g = {3.0f, 0.0f, -4.0f};
  EXPECT_DOUBLE_EQ(global_l2_norm(g), 5.0);
  // min(1, 0.3 / (5 + 1e-6)) in fp32.
  EXPECT_FLOAT_EQ(clip_coefficient(5.0, 0.3), static_cast<float>(0.3 / (5.0 + 1e-6)));
  EXPECT_EQ(clip_coefficient(0.1, 0.3), 1.0f);  // below the threshold: no clipping
  const double norm = clip_grad_norm(g, 0.3);
  EXPECT_DOUBLE_EQ(norm, 5.0);  // the norm before clipping
  EXPECT_NEAR(global_l2_norm(g), 0.3, 1e-6);
  EXPECT_FLOAT_EQ(g[0], 3.0f * clip_coefficient(5.0, 0.3));
}

TEST(Clip, SmallGradientsAreUnchangedAndNonFiniteFails) {
  std::vector<float> g = {0.01f, -0.02f};
  const std::vector<float> before = g;
  clip_grad_norm(g, 0.3);
  EXPECT_EQ(g, before);
  clip_grad_norm(g, 0.0);  // off: norm only
  EXPECT_EQ(g, before);
  g[1] = std::nanf("");
  EXPECT_THROW(clip_grad_norm(g, 0.3), Error);
}

// The fixed-chunk reduction is independent of thread scheduling: a long vector's norm equals the
// fp64 sum taken in order to within fp64 rounding.
TEST(Clip, LongVectorNormMatchesASequentialFp64Sum) {
  std::vector<float> g(1'000'003);
  Rng rng(5);
  double ss = 0.0;
  for (float& x : g) {
    x = static_cast<float>(rng.normal());
    ss += static_cast<double>(x) * x;
  }
  EXPECT_NEAR(global_l2_norm(g), std::sqrt(ss), 1e-9 * std::sqrt(ss));
  EXPECT_EQ(global_l2_norm(g), global_l2_norm(g));
}

TEST(FakeQuant, Int6RowsOnExactValues) {
  // Row 0: max |w| = 1.9375 = 31 · 0.0625, so s = 0.0625 and w/s is exact: 1.5 -> 2 and 2.5 -> 2
  // (round half to even), −31 stays, 0.3125/0.0625 = 5.
  // Row 1: max |w| = 0.5 < 1, so s = 1/31 (the floor): 0.5·31 = 15.5 -> 16, −0.25·31 = −7.75 -> −8.
  const std::vector<float> w = {0.09375f, 0.15625f, -1.9375f, 0.3125f, 0.5f, -0.25f, 0.0f, 0.01f};
  std::vector<float> q(w.size());
  fake_quantize_rows(w, 2, 4, 6, q);
  const float s0 = 0.0625f, s1 = std::max(0.5f / 31.0f, 1.0f / 31.0f);
  EXPECT_EQ(q[0], 2 * s0);
  EXPECT_EQ(q[1], 2 * s0);
  EXPECT_EQ(q[2], -31 * s0);
  EXPECT_EQ(q[3], 5 * s0);
  EXPECT_EQ(q[4], std::rint(0.5f / s1) * s1);
  EXPECT_EQ(std::rint(0.5f / s1), 16.0f);
  EXPECT_EQ(q[5], -8 * s1);
  EXPECT_EQ(q[6], 0.0f);
  EXPECT_EQ(q[7], 0.0f);  // 0.01·31 = 0.31 -> 0
}

TEST(FakeQuant, CodesStayInRangeAndErrorIsAtMostHalfAStep) {
  const int64_t rows = 16, cols = 64;
  std::vector<float> w(rows * cols), q(w.size());
  Rng rng(11);
  for (float& x : w) x = static_cast<float>(3.0 * rng.normal());
  fake_quantize_rows(w, rows, cols, 6, q);
  for (int64_t r = 0; r < rows; ++r) {
    float row_max = 0.0f;
    for (int64_t j = 0; j < cols; ++j) row_max = std::max(row_max, std::fabs(w[r * cols + j]));
    const float s = std::max(row_max / 31.0f, 1.0f / 31.0f);
    for (int64_t j = 0; j < cols; ++j) {
      const float code = q[r * cols + j] / s;  // k·s rounded, divided back: k within fp32 rounding
      EXPECT_NEAR(code, std::rint(code), 1e-4) << "not a multiple of the row scale";
      EXPECT_GE(std::rint(code), -32.0f);
      EXPECT_LE(std::rint(code), 31.0f);
      EXPECT_LE(std::fabs(q[r * cols + j] - w[r * cols + j]), 0.5f * s * (1.0f + 1e-6f));
    }
  }
  EXPECT_THROW(fake_quantize_rows(w, rows, cols + 1, 6, q), Error);
}

}  // namespace
