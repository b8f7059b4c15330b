// Unit tests of the quantizers on hand-made inputs: quantile interpolation, the clip / floor / range
// rules of each row-wise quantizer, the choice rules of GPTQ-lite (per matrix) and s562 (per row), GPTQ
// properties, the Hessian accumulator and int6 bit packing.
#include <gtest/gtest.h>

#include <cmath>

#include "core/half.h"
#include "core/rng.h"
#include "quant/gptq.h"
#include "quant/int6_pack.h"
#include "quant/quantile.h"
#include "quant/rowwise.h"

using namespace pgolf;

namespace {

std::vector<int> as_ints(const std::vector<int8_t>& c) { return {c.begin(), c.end()}; }

std::vector<float> random_matrix(int64_t rows, int64_t cols, uint64_t seed, double std) {
  Rng rng(seed);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (auto& x : w) x = static_cast<float>(std * rng.normal());
  return w;
}

double mse(std::span<const float> a, std::span<const float> b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return s / static_cast<double>(a.size());
}

// The five clip candidates of GPTQ-lite / s562 for one row (the rule under test, restated).
std::vector<float> candidate_clips(std::span<const float> row) {
  auto s = sorted_abs(row);
  return {quantile_sorted(s, 0.999f), quantile_sorted(s, 0.9995f), quantile_sorted(s, 0.9999f),
          quantile_sorted(s, 0.99999f), s.back()};
}

}  // namespace

TEST(Quantile, LinearInterpolationAtFp32Rank) {
  const std::vector<float> v = {1, 2, 3, 4, 5};
  EXPECT_EQ(quantile_sorted(v, 0.0f), 1.0f);
  EXPECT_EQ(quantile_sorted(v, 1.0f), 5.0f);
  EXPECT_EQ(quantile_sorted(v, 0.25f), 2.0f);
  const std::vector<float> two = {0.0f, 10.0f};
  EXPECT_EQ(quantile_sorted(two, 0.75f), 7.5f);  // weight >= 0.5 branch: end - (end - start)(1 - w)
  // rank 0.3f: the fp32 value of 0.3 times 10, rounded once (fused multiply-add).
  EXPECT_EQ(quantile_sorted(two, 0.3f), static_cast<float>(0.3f * 10.0));
  EXPECT_THROW(quantile_sorted(std::vector<float>{}, 0.5f), Error);
  EXPECT_EQ(sorted_abs(std::vector<float>{-3, 1, -2}), (std::vector<float>{1, 2, 3}));
}

TEST(PercentileClip, BaselineInt8RowClipScaleAndFloor) {
  // Row 0: clip just below 2.0 (the 0.9999984 quantile of 4 values), scale = clip / 127.
  // Row 1: small values: the 1/127 floor sets the step.
  const std::vector<float> w = {0.3f, -0.2f, 0.0f, 2.0f, 0.01f, -0.02f, 0.005f, 0.0f};
  ScaledCodes q = quantize_percentile_clip(w, {2, 4}, 127, -127, 127);
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{19, -13, 0, 127, 1, -3, 1, 0}));
  ASSERT_EQ(q.scale.dtype, DType::F16);
  ASSERT_EQ(q.scale.shape, Shape{2});
  const auto s = scale_values(q.scale);
  EXPECT_NEAR(s[0], 2.0 / 127, 1e-5);
  EXPECT_EQ(s[1], round_to_f16(1.0f / 127));
  const auto deq = dequantize_codes(q.codes, q.scale, {2, 4});
  EXPECT_EQ(deq[0], 19.0f * s[0]);
  EXPECT_EQ(deq[5], -3.0f * s[1]);
}

TEST(PercentileClip, PerTensorScaleForVectorsAndS600Range) {
  // A 1-D tensor gets one fp32 scale = clip / 127.
  const std::vector<float> v = {0.5f, -1.0f, 0.1f};
  ScaledCodes q = quantize_percentile_clip(v, {3}, 127, -127, 127);
  ASSERT_EQ(q.scale.dtype, DType::F32);
  EXPECT_TRUE(q.scale.shape.empty());
  EXPECT_NEAR(q.scale.as<float>()[0], 1.0 / 127, 1e-7);
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{64, -127, 13}));
  // s600: levels 31, codes clamped to [-31, 30] (the row's clip maps to 31 and is clamped).
  const std::vector<float> w = {1.0f, -1.0f, 0.4f, 0.0f};
  ScaledCodes p = quantize_percentile_clip(w, {1, 4}, 31, -31, 30);
  EXPECT_EQ(as_ints(p.codes), (std::vector<int>{30, -31, 12, 0}));
  EXPECT_EQ(scale_values(p.scale)[0], round_to_f16(1.0f / 31));
}

TEST(Rowmax, ScaleFromRowMaxWithFloorAndRange) {
  const std::vector<float> w = {-1.0f, 0.5f, 0.26f, 0.0f, 0.01f, -0.02f, 0.0f, 0.0f};
  ScaledCodes q = quantize_rowmax(w, {2, 4}, 31, -32, 1.0f / 31);
  const auto s = scale_values(q.scale);
  EXPECT_EQ(s[0], round_to_f16(1.0f / 31));
  EXPECT_EQ(s[1], round_to_f16(1.0f / 31));  // floor: the row max 0.02 would give a far smaller step
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{-31, 16, 8, 0, 0, -1, 0, 0}));
  // I6's 1e-12 floor lets small rows use their own row max.
  ScaledCodes i6 = quantize_rowmax(w, {2, 4}, 31, -32, 1e-12f);
  EXPECT_EQ(scale_values(i6.scale)[1], round_to_f16(0.02f / 31));
  EXPECT_EQ(as_ints(i6.codes), (std::vector<int>{-31, 16, 8, 0, 16, -31, 0, 0}));
  // A row so small that its fp16 scale is 0: codes go to the ends of the range (both int6 ranges).
  const std::vector<float> tiny = {-1e-7f, 1e-7f, 0.0f, 0.0f};
  for (int lo : {-32, -31}) {
    ScaledCodes t = quantize_rowmax(tiny, {1, 4}, 31, lo, 1e-12f);
    EXPECT_EQ(scale_values(t.scale)[0], 0.0f);
    EXPECT_EQ(as_ints(t.codes), (std::vector<int>{lo, 31, 0, 0}));
  }
}

TEST(GptqLite, OnePercentilePerMatrixMinimizesMatrixError) {
  // Row 0 has one outlier: a clipped candidate wins for the whole matrix, row 1 included.
  const int64_t rows = 2, cols = 4000;
  auto w = random_matrix(rows, cols, 7, 1.5);
  w[17] = 60.0f;
  ScaledCodes q = quantize_gptq_lite(w, {rows, cols}, 31);
  const auto s = scale_values(q.scale);
  const auto deq = dequantize_codes(q.codes, q.scale, {rows, cols});
  int chosen = -1;
  double best = INFINITY;
  for (int k = 0; k < 5; ++k) {
    std::vector<float> cand(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      auto c = candidate_clips(std::span<const float>(w).subspan(r * cols, cols));
      cand[r] = round_to_f16(std::max(c[k] / 31.0f, 1.0f / 31));
    }
    HostTensor st(DType::F32, {rows});
    std::copy(cand.begin(), cand.end(), st.as<float>().begin());
    std::vector<int8_t> codes(w.size());
    for (size_t i = 0; i < w.size(); ++i)
      codes[i] = static_cast<int8_t>(std::clamp(std::nearbyint(w[i] / cand[i / cols]), -31.0f, 31.0f));
    const double e = mse(w, dequantize_codes(codes, st, {rows, cols}));
    EXPECT_LE(mse(w, deq), e) << "candidate " << k;
    if (cand[0] == s[0] && cand[1] == s[1]) chosen = k;
    best = std::min(best, e);
  }
  EXPECT_GE(chosen, 0) << "the scales are not one candidate's for every row";
  EXPECT_LT(chosen, 4) << "the row max should lose against a clipped candidate";
  EXPECT_EQ(mse(w, deq), best);
  for (auto c : q.codes) EXPECT_LE(std::abs(int(c)), 31);
}

TEST(RowSearch, EachRowKeepsItsOwnBestCandidate) {
  const int64_t rows = 3, cols = 3000;
  auto w = random_matrix(rows, cols, 11, 0.05);
  w[5] = 3.0f;  // row 0: one outlier, a clipped candidate wins
  // Row 2: values k/15 with |k| <= 14 and one 1.0: only the row max puts them on its grid.
  for (int64_t j = 0; j < cols; ++j) w[2 * cols + j] = static_cast<float>((j % 29) - 14) / 15.0f;
  w[2 * cols + 100] = 1.0f;
  ScaledCodes q = quantize_row_search(w, {rows, cols}, 15);
  const auto s = scale_values(q.scale);
  const auto deq = dequantize_codes(q.codes, q.scale, {rows, cols});
  std::vector<int> chosen(rows, -1);
  for (int64_t r = 0; r < rows; ++r) {
    auto row = std::span<const float>(w).subspan(r * cols, cols);
    auto c = candidate_clips(row);
    const double got = mse(row, std::span<const float>(deq).subspan(r * cols, cols));
    for (int k = 0; k < 5; ++k) {
      const float sc = std::max(round_to_f16(std::max(c[k] / 15.0f, 1e-12f)), 6.103515625e-05f);
      std::vector<float> rec(row.size());
      for (size_t j = 0; j < row.size(); ++j) rec[j] = std::clamp(std::nearbyint(row[j] / sc), -16.0f, 15.0f) * sc;
      EXPECT_LE(got, mse(row, rec)) << "row " << r << " candidate " << k;
      if (sc == s[r] && chosen[r] < 0) chosen[r] = k;
    }
  }
  EXPECT_LT(chosen[0], 4);
  EXPECT_EQ(chosen[2], 4);
  for (auto c : q.codes) EXPECT_TRUE(c >= -16 && c <= 15);
}

TEST(RowSearch, VectorsGetOneFp16Scale) {
  const std::vector<float> v = {0.3f, -0.62f};
  ScaledCodes q = quantize_row_search(v, {2}, 31);
  EXPECT_EQ(q.scale.dtype, DType::F16);
  EXPECT_EQ(scale_values(q.scale)[0], round_to_f16(static_cast<float>(0.62f / 31.0)));
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{15, -31}));
}

TEST(Gptq, IdentityHessianIsRoundToNearestWithSdClipScales) {
  const int64_t rows = 8, cols = 256;  // two blocks of 128
  const auto w = random_matrix(rows, cols, 3, 0.05);
  std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t j = 0; j < cols; ++j) h[j * cols + j] = 2.0f;
  ScaledCodes q = quantize_gptq(w, {rows, cols}, h, {31, 12.85, 128, 0.01}, "w");
  const auto s = scale_values(q.scale);
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, ss = 0;
    for (int64_t j = 0; j < cols; ++j) mean += w[r * cols + j];
    mean /= cols;
    for (int64_t j = 0; j < cols; ++j) ss += (w[r * cols + j] - mean) * (w[r * cols + j] - mean);
    const float sd = static_cast<float>(std::sqrt(ss / (cols - 1)));
    EXPECT_EQ(s[r], round_to_f16(12.85f * sd / 31.0f)) << r;
    for (int64_t j = 0; j < cols; ++j)
      EXPECT_EQ(q.codes[r * cols + j], std::clamp(std::nearbyint(w[r * cols + j] / s[r]), -31.0f, 31.0f));
  }
}

TEST(Gptq, ErrorCompensationLowersTheLayerOutputError) {
  // Correlated inputs X [n, cols]: GPTQ should beat round-to-nearest (same scales) on ||X (W - Q)ᵀ||.
  const int64_t rows = 16, cols = 192, n = 512;
  Rng rng(5);
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (int64_t i = 0; i < n; ++i) {
    const double common = rng.normal();
    for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = static_cast<float>(common + 0.3 * rng.normal());
  }
  HessianAccumulator acc(cols);
  acc.add(x, n);
  acc.end_batch();
  const auto h = acc.finalize();
  const auto w = random_matrix(rows, cols, 9, 0.05);
  ScaledCodes g = quantize_gptq(w, {rows, cols}, h, {31, 12.85, 128, 0.01}, "w");
  const auto s = scale_values(g.scale);
  std::vector<float> rtn(w.size()), gq = dequantize_codes(g.codes, g.scale, {rows, cols});
  for (size_t i = 0; i < w.size(); ++i)
    rtn[i] = std::clamp(std::nearbyint(w[i] / s[i / cols]), -31.0f, 31.0f) * s[i / cols];
  auto output_error = [&](const std::vector<float>& q) {
    double e = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        double d = 0;
        for (int64_t j = 0; j < cols; ++j) d += double(x[i * cols + j]) * (w[r * cols + j] - q[r * cols + j]);
        e += d * d;
      }
    return e;
  };
  EXPECT_LT(output_error(gq), 0.5 * output_error(rtn));
}

TEST(Gptq, DeadColumnsAreZeroAndBadHessiansAreRefused) {
  const int64_t rows = 4, cols = 8;
  const auto w = random_matrix(rows, cols, 1, 0.5);
  std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t j = 0; j < cols; ++j) h[j * cols + j] = j == 3 ? 0.0f : 1.0f + 0.1f * j;
  ScaledCodes q = quantize_gptq(w, {rows, cols}, h, {31, 12.85, 4, 0.01}, "w");
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(q.codes[r * cols + 3], 0);
  std::vector<float> neg(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t j = 0; j < cols; ++j) neg[j * cols + j] = -1.0f;
  EXPECT_THROW(quantize_gptq(w, {rows, cols}, neg, {}, "w"), Error);
  EXPECT_THROW(quantize_gptq(w, {rows, cols}, std::vector<float>(10), {}, "w"), Error);
}

TEST(HessianAccumulator, SumsXtXOverPassesAndDividesByBatches) {
  const int64_t cols = 5;
  std::vector<std::vector<float>> xs = {random_matrix(7, cols, 1, 1.0), random_matrix(3, cols, 2, 1.0),
                                        random_matrix(6, cols, 3, 1.0)};
  HessianAccumulator acc(cols);
  acc.add(xs[0], 7);
  acc.add(xs[1], 3);  // a second pass of a looped layer in the same batch
  acc.end_batch();
  acc.add(xs[2], 6);
  acc.end_batch();
  EXPECT_EQ(acc.batches(), 2);
  const auto h = acc.finalize();
  for (int64_t a = 0; a < cols; ++a)
    for (int64_t b = 0; b < cols; ++b) {
      double ref = 0;
      for (auto& x : xs)
        for (size_t i = 0; i < x.size() / cols; ++i) ref += double(x[i * cols + a]) * x[i * cols + b];
      ref /= 2;
      // 16 fp32 products summed: relative error a few fp32 ulps of the magnitudes involved.
      EXPECT_NEAR(h[a * cols + b], ref, 1e-5 * 16) << a << "," << b;
      EXPECT_EQ(h[a * cols + b], h[b * cols + a]);
    }
  HessianAccumulator empty(3);
  EXPECT_THROW(empty.finalize(), Error);
  EXPECT_THROW(empty.add(std::vector<float>(5), 2), Error);
}

TEST(HessianSet, NamesTensorsAndCountsBatchesFromTheStart) {
  HessianSet set;
  const auto x = random_matrix(4, 3, 1, 1.0);
  set.add("blocks.0.mlp.fc.weight", x, 4, 3);
  set.end_batch();
  set.add("blocks.0.mlp.fc.weight", x, 4, 3);
  set.add("tok_emb.weight", x, 4, 3);  // first seen in the second batch: still divided by 2
  set.end_batch();
  const TensorMap t = set.finalize();
  ASSERT_TRUE(t.has("hessian/tok_emb.weight"));
  const auto a = t.get("hessian/blocks.0.mlp.fc.weight").as<float>();
  const auto b = t.get("hessian/tok_emb.weight").as<float>();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_FLOAT_EQ(b[i], 0.5f * a[i]);
  EXPECT_THROW(set.add("tok_emb.weight", x, 3, 4), Error);
}

TEST(Int6Pack, KnownBytesAndRoundTrip) {
  const std::vector<int8_t> codes = {-32, 31, 0, 1};
  EXPECT_EQ(pack_int6(codes), (std::vector<uint8_t>{0xC0, 0x0F, 0x86}));
  for (size_t n : {1u, 2u, 3u, 4u, 5u, 63u, 64u, 130u}) {
    std::vector<int8_t> c(n);
    for (size_t i = 0; i < n; ++i) c[i] = static_cast<int8_t>(static_cast<int>(i * 37 % 64) - 32);
    const auto p = pack_int6(c);
    EXPECT_EQ(p.size(), 3 * ((n + 3) / 4));
    EXPECT_EQ(unpack_int6(p, n), c) << n;
  }
  EXPECT_THROW(pack_int6(std::vector<int8_t>{32}), Error);
  EXPECT_THROW(unpack_int6(std::vector<uint8_t>(4), 4), Error);
}
