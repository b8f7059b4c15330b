// Forward values of the CPU ops against hand-computed or independently computed references.
#include <gtest/gtest.h>

#include <array>
#include <cmath>

#include "backend/cpu/activation.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/fake_quant.h"
#include "backend/cpu/gemm.h"
#include "backend/cpu/linear.h"
#include "backend/cpu/ngram_hash.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/cpu/rope.h"
#include "backend/cpu/smear.h"
#include "backend/cpu/softcap_ce.h"
#include "backend/cpu/xsa.h"
#include "core/half.h"
#include "fd_check.h"

using namespace pgolf;
using namespace pgolf::cpu;

// Large enough to be split into panels across threads (both the row and the column split, every
// transpose combination, strided operands); checked against a naive triple loop in fp64.
TEST(OpValues, GemmAllTransposesAndPanelSplits) {
  Rng rng(4);
  for (auto [M, N, K] : {std::array<int64_t, 3>{300, 70, 90}, {70, 300, 90}}) {
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
        auto A = test::random_vector(rng, static_cast<size_t>((ta ? K : M) * lda));
        auto B = test::random_vector(rng, static_cast<size_t>((tb ? N : K) * ldb));
        auto C = test::random_vector(rng, static_cast<size_t>(M * ldc));
        std::vector<double> ref = C;
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            double acc = 0;
            for (int64_t k = 0; k < K; ++k)
              acc += (ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
            ref[i * ldc + j] = 0.5 * acc + 2.0 * ref[i * ldc + j];
          }
        gemm<double>(ta, tb, M, N, K, 0.5, A.data(), lda, B.data(), ldb, 2.0, C.data(), ldc);
        // Every element, the stride padding included (ref keeps C's padding: it must stay untouched).
        for (size_t i = 0; i < C.size(); ++i)
          ASSERT_NEAR(C[i], ref[i], 1e-11) << M << "x" << N << " ta " << ta << " tb " << tb << " at " << i;
      }
  }
}

// Expected values computed with Python's int arithmetic emulating int32 wrap (the references'
// torch.int32 tensors) and floor modulo; 36313·65535 wraps to −1915194841.
TEST(OpValues, NgramHashIndices) {
  const std::vector<int32_t> ids = {5, 7, 1023, 65535, 0, 3};
  std::vector<int32_t> out(ids.size());
  bigram_hash_indices(ids.data(), 1, 6, 2048, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{2047, 1082, 53, 32, 1604, 448}));
  trigram_hash_indices(ids.data(), 1, 6, 2048, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{2047, 2047, 879, 211, 876, 948}));
  direct_bigram_indices(ids.data(), 1, 6, 1024, 2048, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{5, 1031, 2047, 1023, 1024, 3}));
  // Two rows of 3: position 0 of the second row gets the start value too.
  bigram_hash_indices(ids.data(), 2, 3, 2048, out.data());
  EXPECT_EQ(out[3], 2047);
  direct_bigram_indices(ids.data(), 2, 3, 1024, 2048, out.data());
  EXPECT_EQ(out[3], 65535 % 2048);
}

TEST(OpValues, RmsNormUsesFp32Epsilon) {
  // A zero row normalizes to zero with rstd = 1/sqrt(2^-23) (not infinity); a constant row to ±1.
  const std::vector<double> x = {0, 0, 0, 0, 3, -3, 3, -3};
  std::vector<double> y(8), r(2);
  rmsnorm_forward(x.data(), y.data(), r.data(), 2, 4, 1.0);
  EXPECT_DOUBLE_EQ(r[0], 1.0 / std::sqrt(std::ldexp(1.0, -23)));
  EXPECT_EQ(y[0], 0.0);
  EXPECT_NEAR(y[4], 3.0 / std::sqrt(9.0 + std::ldexp(1.0, -23)), 1e-15);
  EXPECT_NEAR(y[5], -y[4], 1e-15);
}

TEST(OpValues, RopeTableAndRotation) {
  const double base = 10000.0 * std::pow(2.0, 8.0 / 6.0);  // the golden S691 NTK base at rd = 8
  const RopeTable t = make_rope_table(base, 8, 130);
  // inv_freq_j = 1/base^(2j/rd) and the angle in fp32; compare to fp64 within fp32 rounding.
  for (int p : {0, 1, 77, 129})
    for (int j = 0; j < 4; ++j) {
      const double angle = p * std::pow(base, -2.0 * j / 8.0);
      EXPECT_NEAR(t.cos[p * 4 + j], std::cos(angle), 1e-5 + 1e-7 * p) << p << " " << j;
      EXPECT_NEAR(t.sin[p * 4 + j], std::sin(angle), 1e-5 + 1e-7 * p) << p << " " << j;
    }
  // Partial rotation of one head (Dh = 12, rd = 8): dims 8.. pass through, position 0 is the identity.
  std::vector<double> x(2 * 12);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1 * static_cast<double>(i) - 0.7;
  std::vector<double> y = x;
  const std::vector<int32_t> pos = {0, 77};
  rope_forward(y.data(), pos.data(), t, 2, 1, 12);
  for (int d = 0; d < 12; ++d) EXPECT_EQ(y[d], x[d]);
  for (int d = 8; d < 12; ++d) EXPECT_EQ(y[12 + d], x[12 + d]);
  for (int j = 0; j < 4; ++j) {
    const double c = t.cos[77 * 4 + j], s = t.sin[77 * 4 + j];
    EXPECT_NEAR(y[12 + j], x[12 + j] * c + x[12 + j + 4] * s, 1e-15);
    EXPECT_NEAR(y[12 + j + 4], -x[12 + j] * s + x[12 + j + 4] * c, 1e-15);
  }
}

// Attention against a dense softmax written out per head, with the segment mask.
TEST(OpValues, AttentionMatchesDenseSoftmaxPerSegment) {
  Rng rng(1);
  const AttentionShape s{7, 4, 2, 3};
  const std::vector<int32_t> cu = {0, 3, 7};
  auto q = test::random_vector(rng, 7 * 4 * 3), k = test::random_vector(rng, 7 * 2 * 3),
       v = test::random_vector(rng, 7 * 2 * 3);
  std::vector<double> y(q.size()), lse(7 * 4);
  const double scale = 0.37;
  attention_forward(q.data(), k.data(), v.data(), y.data(), lse.data(), cu.data(), 2, s, scale);
  for (int i = 0; i < 7; ++i) {
    const int seg_start = i < 3 ? 0 : 3;
    for (int h = 0; h < 4; ++h) {
      const int g = h / 2;
      std::vector<double> w;
      double z = 0;
      for (int j = seg_start; j <= i; ++j) {
        double dot = 0;
        for (int d = 0; d < 3; ++d) dot += q[(i * 4 + h) * 3 + d] * k[(j * 2 + g) * 3 + d];
        w.push_back(std::exp(dot * scale));
        z += w.back();
      }
      EXPECT_NEAR(lse[i * 4 + h], std::log(z), 1e-12);
      for (int d = 0; d < 3; ++d) {
        double ref = 0;
        for (int j = seg_start; j <= i; ++j) ref += w[static_cast<size_t>(j - seg_start)] / z * v[(j * 2 + g) * 3 + d];
        EXPECT_NEAR(y[(i * 4 + h) * 3 + d], ref, 1e-12) << i << " " << h << " " << d;
      }
    }
  }
}

TEST(OpValues, XsaRemovesTheOwnValueDirection) {
  Rng rng(2);
  auto y = test::random_vector(rng, 3 * 4 * 5), v = test::random_vector(rng, 3 * 2 * 5);
  std::vector<double> out(y.size());
  xsa_forward(y.data(), v.data(), out.data(), 3, 4, 2, 5);
  for (int i = 0; i < 3; ++i)
    for (int h = 0; h < 4; ++h) {
      double dot = 0, moved = 0;
      for (int d = 0; d < 5; ++d) {
        dot += out[(i * 4 + h) * 5 + d] * v[(i * 2 + h / 2) * 5 + d];
        moved += std::fabs(out[(i * 4 + h) * 5 + d] - y[(i * 4 + h) * 5 + d]);
      }
      EXPECT_NEAR(dot, 0.0, 1e-12);
      EXPECT_GT(moved, 1e-6);
    }
}

TEST(OpValues, SoftcapCrossEntropy) {
  // Equal logits: loss ln V; a huge logit is capped at 30 (tanh saturates).
  const std::vector<double> z = {0, 0, 0, 1e4, 0, -1e4};
  const std::vector<int32_t> t = {1, 0};
  std::vector<double> capped(6), loss(2), lse(2);
  softcap_ce_forward(z.data(), capped.data(), t.data(), loss.data(), lse.data(), 2, 3, 30.0);
  EXPECT_NEAR(loss[0], std::log(3.0), 1e-15);
  EXPECT_DOUBLE_EQ(capped[3], 30.0);
  EXPECT_DOUBLE_EQ(capped[5], -30.0);
  EXPECT_NEAR(loss[1], std::log(std::exp(30.0) + 1 + std::exp(-30.0)) - 30.0, 1e-12);
  // Moderate value: capped = 30·tanh(z/30).
  const std::vector<double> z2 = {12.0, -3.0};
  std::vector<double> c2(2), l2(1), s2(1);
  const std::vector<int32_t> t2 = {1};
  softcap_ce_forward(z2.data(), c2.data(), t2.data(), l2.data(), s2.data(), 1, 2, 30.0);
  EXPECT_NEAR(c2[0], 30.0 * std::tanh(0.4), 1e-14);
}

TEST(OpValues, FakeQuantInt6RoundsHalfToEvenPerRow) {
  // Row 0: max 1.9375 = 31/16 → scale 1/16; 0.09375 = 1.5 steps → 2, 0.15625 = 2.5 → 2, −0.21875 = −3.5 → −4.
  // Row 1: max 0.01 → scale clamps to 1/31; everything rounds to 0.
  const std::vector<float> w = {1.9375f, 0.09375f, 0.15625f, -0.21875f, 0.01f, -0.004f, 0.0f, 0.0f};
  std::vector<float> q(w.size());
  fake_quant_int6_rows(w.data(), q.data(), 2, 4);
  EXPECT_EQ(q[0], 1.9375f);
  EXPECT_EQ(q[1], 0.125f);
  EXPECT_EQ(q[2], 0.125f);
  EXPECT_EQ(q[3], -0.25f);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(q[i], 0.0f);
  // Codes clamp at −32 ... 31: a row whose negative extreme is the max |w| reaches −31 only.
  const std::vector<float> neg = {-3.1f, 1.0f};
  std::vector<float> qn(2);
  fake_quant_int6_rows(neg.data(), qn.data(), 1, 2);
  EXPECT_FLOAT_EQ(qn[0], -31.0f * (3.1f / 31.0f));
}

TEST(OpValues, SmearZeroPredecessorAtRowStart) {
  const std::vector<double> x = {1, 2, 3, 4, 5, 6};  // 2 rows of 3 tokens, dim 1
  const std::vector<double> gate = {0.0};          // g = 0.5
  std::vector<double> y(6);
  smear_forward(x.data(), gate.data(), y.data(), 2, 3, 1);
  EXPECT_EQ(y, (std::vector<double>{0.5, 1.5, 2.5, 2.0, 4.5, 5.5}));
}

TEST(OpValues, LeakyReluSquare) {
  const std::vector<double> pre = {-2.0, 0.0, 3.0};
  std::vector<double> post(3);
  leaky_relu_sq_forward(pre.data(), post.data(), 3, 0.5);
  EXPECT_EQ(post, (std::vector<double>{1.0, 0.0, 9.0}));
  leaky_relu_sq_forward(pre.data(), post.data(), 3, 0.0);
  EXPECT_EQ(post, (std::vector<double>{0.0, 0.0, 9.0}));
}

// A linear's bf16 input gradient (CpuModel::set_bf16_norm_grads): round to nearest, ties to even, in one
// step from the exact value. 1 + 2⁻⁸ is the midpoint of the bf16 neighbours 1 and 1 + 2⁻⁷; a double just
// above it rounds to float exactly onto it, where a second rounding would go to the even neighbour 1.
TEST(OpValues, RoundToBf16IsOneRoundingFromTheExactValue) {
  const double mid = 1.0 + std::ldexp(1.0, -8);
  std::vector<double> d = {mid, mid + std::ldexp(1.0, -40), mid - std::ldexp(1.0, -40), -(mid + std::ldexp(1.0, -40)),
                           1.0 + 3 * std::ldexp(1.0, -8), 3.0e-3, 0.0};
  round_to_bf16(d.data(), static_cast<int64_t>(d.size()));
  const std::vector<double> expected = {1.0, 1.0 + std::ldexp(1.0, -7), 1.0, -(1.0 + std::ldexp(1.0, -7)),
                                        1.0 + std::ldexp(1.0, -6), static_cast<double>(pgolf::round_to_bf16(3.0e-3f)),
                                        0.0};
  EXPECT_EQ(d, expected);
  std::vector<float> f = {1.0f + std::ldexp(1.0f, -8), 1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20), -2.5e-7f};
  const std::vector<float> f_expected = {1.0f, 1.0f + std::ldexp(1.0f, -7), pgolf::round_to_bf16(-2.5e-7f)};
  round_to_bf16(f.data(), static_cast<int64_t>(f.size()));
  EXPECT_EQ(f, f_expected);
}
