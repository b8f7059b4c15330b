// cuBLASLt products against an fp64 reference, bounded by a naive bf16-input / fp32-accumulate host
// product (ENGINEERING §4). Bounds: k = 2 for bf16 outputs, where both errors are dominated by the
// final rounding to bf16 (half an ulp each; a different rounding of a near-tie doubles it at most);
// k = 4 for fp32 outputs, where both errors are accumulation errors and the tensor cores' fp32
// accumulation (blocked, with its own alignment and rounding of addends) is not the sequential
// IEEE sum of the naive loop.
#include <gtest/gtest.h>

#include <tuple>

#include "backend/cuda/gemm.h"
#include "core/error.h"
#include "cuda_test_util.h"

namespace pgolf::test {
namespace {

using cuda::DeviceBuffer;
using cuda::GemmEpilogue;
using cuda::GemmOutput;
using cuda::GemmRunner;
using cuda::GemmShape;

// Host products of the stored row-major operands (see gemm.h): element (b, i, j) of the batch.
struct HostGemm {
  const GemmShape& s;
  const std::vector<float>& a;
  const std::vector<float>& b;

  float a_at(int batch, int i, int p) const {
    return a[batch * s.stride_a + (s.trans_a ? static_cast<int64_t>(p) * s.m + i : static_cast<int64_t>(i) * s.k + p)];
  }
  float b_at(int batch, int p, int j) const {
    return b[batch * s.stride_b + (s.trans_b ? static_cast<int64_t>(j) * s.k + p : static_cast<int64_t>(p) * s.n + j)];
  }
  double exact(int batch, int i, int j) const {
    double acc = 0;
    for (int p = 0; p < s.k; ++p) acc += static_cast<double>(a_at(batch, i, p)) * b_at(batch, p, j);
    return acc;
  }
  float naive(int batch, int i, int j) const {
    float acc = 0;
    for (int p = 0; p < s.k; ++p) acc += a_at(batch, i, p) * b_at(batch, p, j);
    return acc;
  }
};

// Runs one product on the device (D initialised to `d0`) and checks it against fp64 and naive.
void check_gemm(GemmRunner& runner, const GemmShape& s, float alpha, float beta, uint64_t seed,
                const std::string& what, bool with_bias = false) {
  Rng rng(seed);
  const int64_t a_stride = s.batch > 1 ? s.stride_a : int64_t{s.m} * s.k;
  const int64_t b_stride = s.batch > 1 ? s.stride_b : int64_t{s.k} * s.n;
  const int64_t d_stride = s.batch > 1 ? s.stride_d : int64_t{s.m} * s.n;
  std::vector<float> a = random_bf16_values(a_stride * s.batch, rng);
  std::vector<float> b = random_bf16_values(b_stride * s.batch, rng);
  const bool bf16_out = s.output == GemmOutput::kBf16;
  std::vector<float> d0 = bf16_out ? random_bf16_values(d_stride * s.batch, rng) : random_f32_values(d_stride * s.batch, rng);
  std::vector<float> bias = bf16_out ? random_bf16_values(s.n, rng) : random_f32_values(s.n, rng);

  GemmShape shape = s;
  shape.stride_a = a_stride, shape.stride_b = b_stride, shape.stride_d = d_stride;
  HostGemm host{shape, a, b};
  // Elements between the matrices of a batch must stay as they were.
  std::vector<double> ref(d0.begin(), d0.end());
  std::vector<float> naive = d0;
  for (int batch = 0; batch < s.batch; ++batch) {
    for (int i = 0; i < s.m; ++i) {
      for (int j = 0; j < s.n; ++j) {
        const int64_t idx = batch * d_stride + int64_t{i} * s.n + j;
        double r = alpha * host.exact(batch, i, j) + beta * static_cast<double>(d0[idx]);
        // With a bf16 C, a bf16 computation of alpha·A·B + beta·C rounds the product to bf16 before
        // the sum (as two framework ops would, and as cuBLASLt's bf16 epilogue was measured to: its
        // error with beta != 0 reached 1.7x that of a single rounding).
        float product = alpha * host.naive(batch, i, j);
        if (bf16_out && beta != 0.0f) product = round_to_bf16(product);
        float nv = product + beta * d0[idx];
        if (with_bias) r += bias[j], nv += bias[j];
        ref[idx] = r;
        naive[idx] = bf16_out ? round_to_bf16(nv) : nv;
      }
    }
  }

  DeviceBuffer<__nv_bfloat16> da = to_device_bf16(a), db = to_device_bf16(b);
  std::vector<float> got;
  if (bf16_out) {
    DeviceBuffer<__nv_bfloat16> dd = to_device_bf16(d0), dbias = to_device_bf16(bias);
    runner.run(shape, da.data(), db.data(), dd.data(), alpha, beta, nullptr, with_bias ? dbias.data() : nullptr);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    got = from_device_bf16(dd);
  } else {
    DeviceBuffer<float> dd(d0), dbias(bias);
    runner.run(shape, da.data(), db.data(), dd.data(), alpha, beta, nullptr, with_bias ? dbias.data() : nullptr);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    got = dd.download();
  }
  expect_within_naive(what, got, naive, ref, bf16_out ? 2.0 : 4.0);
}

class GemmTransposeTest : public CudaTest,
                          public ::testing::WithParamInterface<std::tuple<bool, bool, GemmOutput>> {};

TEST_P(GemmTransposeTest, MatchesReferenceWithAndWithoutBeta) {
  const auto [trans_a, trans_b, output] = GetParam();
  GemmRunner runner;
  GemmShape s;
  s.m = 136, s.n = 72, s.k = 200;  // leading dimensions stay multiples of 8 in every transpose
  s.trans_a = trans_a, s.trans_b = trans_b, s.output = output;
  const std::string name = std::string(trans_a ? "T" : "N") + (trans_b ? "T" : "N") +
                           (output == GemmOutput::kBf16 ? "_bf16" : "_f32");
  check_gemm(runner, s, 1.0f, 0.0f, 11, name + "_beta0");
  check_gemm(runner, s, 0.75f, 1.0f, 12, name + "_alpha.75_beta1");
  EXPECT_EQ(runner.cached_plans(), 1u);  // same shape, same alignment: one plan
}

INSTANTIATE_TEST_SUITE_P(AllTransposes, GemmTransposeTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool(),
                                            ::testing::Values(GemmOutput::kBf16, GemmOutput::kF32)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) ? "T" : "N") +
                                  (std::get<1>(info.param) ? "T" : "N") +
                                  (std::get<2>(info.param) == GemmOutput::kBf16 ? "_bf16" : "_f32");
                         });

class GemmTest : public CudaTest {};

TEST_F(GemmTest, StridedBatchUsesEveryStride) {
  GemmRunner runner;
  GemmShape s;
  s.m = 64, s.n = 40, s.k = 96, s.trans_b = true, s.batch = 3;
  s.stride_a = 64 * 96 + 8, s.stride_b = 40 * 96 + 24, s.stride_d = 64 * 40 + 16;  // gaps between matrices
  check_gemm(runner, s, 1.0f, 0.0f, 21, "batched_bf16");
  s.output = GemmOutput::kF32;
  check_gemm(runner, s, 1.0f, 1.0f, 22, "batched_f32_beta1");
}

TEST_F(GemmTest, BiasEpilogue) {
  GemmRunner runner;
  GemmShape s;
  s.m = 197, s.n = 88, s.k = 64, s.trans_b = true, s.epilogue = GemmEpilogue::kBias;
  check_gemm(runner, s, 1.0f, 0.0f, 31, "bias_bf16", true);
  s.output = GemmOutput::kF32;
  check_gemm(runner, s, 1.0f, 0.0f, 32, "bias_f32", true);
}

// The three products of a linear layer through linear_forward / linear_backward_*, with an odd token count, and the
// weight gradient accumulated over two micro-steps (beta = 0, then beta = 1).
TEST_F(GemmTest, LinearLayerProductsAndWeightGradientAccumulation) {
  const int tokens = 197, in = 96, out = 40;
  Rng rng(41);
  std::vector<float> x1 = random_bf16_values(tokens * in, rng), x2 = random_bf16_values(tokens * in, rng);
  std::vector<float> w = random_bf16_values(out * in, rng);
  std::vector<float> dy1 = random_bf16_values(tokens * out, rng), dy2 = random_bf16_values(tokens * out, rng);
  GemmRunner runner;
  auto dx1 = to_device_bf16(x1), dx2 = to_device_bf16(x2), dw_in = to_device_bf16(w);
  auto ddy1 = to_device_bf16(dy1), ddy2 = to_device_bf16(dy2);
  auto y = poisoned_buffer<__nv_bfloat16>(tokens * out);
  auto dx = poisoned_buffer<__nv_bfloat16>(tokens * in);
  auto dw = poisoned_buffer<float>(out * in);

  cuda::linear_forward(runner, dx1.data(), dw_in.data(), y.data(), tokens, in, out, nullptr);
  cuda::linear_backward_input(runner, ddy1.data(), dw_in.data(), dx.data(), tokens, in, out, nullptr);
  cuda::linear_backward_weight(runner, ddy1.data(), dx1.data(), dw.data(), tokens, in, out, 0.0f, nullptr);
  cuda::linear_backward_weight(runner, ddy2.data(), dx2.data(), dw.data(), tokens, in, out, 1.0f, nullptr);
  PG_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<double> y_ref(tokens * out), dx_ref(tokens * in), dw_ref(out * in);
  std::vector<float> y_naive(y_ref.size()), dx_naive(dx_ref.size()), dw_naive(dw_ref.size());
  for (int t = 0; t < tokens; ++t) {
    for (int o = 0; o < out; ++o) {
      double r = 0;
      float n = 0;
      for (int i = 0; i < in; ++i) r += double{x1[t * in + i]} * w[o * in + i], n += x1[t * in + i] * w[o * in + i];
      y_ref[t * out + o] = r, y_naive[t * out + o] = round_to_bf16(n);
    }
    for (int i = 0; i < in; ++i) {
      double r = 0;
      float n = 0;
      for (int o = 0; o < out; ++o) r += double{dy1[t * out + o]} * w[o * in + i], n += dy1[t * out + o] * w[o * in + i];
      dx_ref[t * in + i] = r, dx_naive[t * in + i] = round_to_bf16(n);
    }
  }
  for (int o = 0; o < out; ++o) {
    for (int i = 0; i < in; ++i) {
      double r = 0;
      float n1 = 0, n2 = 0;
      for (int t = 0; t < tokens; ++t) {
        r += double{dy1[t * out + o]} * x1[t * in + i] + double{dy2[t * out + o]} * x2[t * in + i];
        n1 += dy1[t * out + o] * x1[t * in + i];
        n2 += dy2[t * out + o] * x2[t * in + i];
      }
      dw_ref[o * in + i] = r, dw_naive[o * in + i] = n1 + n2;
    }
  }
  expect_within_naive("linear_forward", from_device_bf16(y), y_naive, y_ref, 2.0);
  expect_within_naive("linear_backward_input", from_device_bf16(dx), dx_naive, dx_ref, 2.0);
  expect_within_naive("linear_backward_weight_x2", dw.download(), dw_naive, dw_ref, 4.0);
  EXPECT_EQ(runner.cached_plans(), 3u);  // forward, input gradient, weight gradient (beta is not in the plan)
}

// Row strides: A is a column slice of a wider matrix ([m, lda], columns 8..8+k), D is written into a
// column slice of a wider output ([m, ldd], columns 16..16+n); the other columns of D stay untouched.
// The transposed case reads a slice of rows as the m columns of Aᵀ (the weight gradient of one part of
// a fused projection).
TEST_F(GemmTest, ColumnSlicesWithLeadingDimensions) {
  for (const bool trans_a : {false, true}) {
    SCOPED_TRACE(trans_a ? "trans_a" : "plain");
    const int m = 72, n = 40, k = 56, lda = 96, ldd = 64, a_col = 8, d_col = 16;
    const int a_rows = trans_a ? k : m;  // stored A: [m, k] or [k, m], as a slice of [a_rows, lda]
    Rng rng(51 + trans_a);
    std::vector<float> a = random_bf16_values(size_t(a_rows) * lda, rng), b = random_bf16_values(size_t(n) * k, rng);
    std::vector<float> d0 = random_f32_values(size_t(m) * ldd, rng);
    auto da = to_device_bf16(a), db = to_device_bf16(b);
    DeviceBuffer<float> dd(d0);
    GemmShape s;
    s.m = m, s.n = n, s.k = k, s.trans_a = trans_a, s.trans_b = true, s.output = GemmOutput::kF32;
    s.lda = lda, s.ldd = ldd;
    GemmRunner runner;
    runner.run(s, da.data() + a_col, db.data(), dd.data() + d_col, 1.0f, 1.0f, nullptr);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> ref(d0.begin(), d0.end());
    std::vector<float> naive = d0;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double r = 0;
        float nv = 0;
        for (int p = 0; p < k; ++p) {
          const float av = trans_a ? a[size_t(p) * lda + a_col + i] : a[size_t(i) * lda + a_col + p];
          r += double{av} * b[size_t(j) * k + p];
          nv += av * b[size_t(j) * k + p];
        }
        ref[size_t(i) * ldd + d_col + j] += r;
        naive[size_t(i) * ldd + d_col + j] += nv;
      }
    const std::vector<float> got = dd.download();
    expect_within_naive(trans_a ? "slice_trans_a" : "slice", got, naive, ref, 4.0);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < ldd; ++j)
        if (j < d_col || j >= d_col + n) ASSERT_EQ(got[size_t(i) * ldd + j], d0[size_t(i) * ldd + j]) << i << "," << j;
  }
}

// Autotuned plans (set_gemm_autotune): the first run times the candidates on the call's own D, which
// with beta != 0 must be put back before the product. Every product, the timed first and the later
// runs of a plan, stays within the bounds: plain, weight-gradient, batched with gaps, bias.
TEST_F(GemmTest, AutotunedPlansKeepTheProduct) {
  struct Restore {
    bool was = cuda::gemm_autotune();
    ~Restore() { cuda::set_gemm_autotune(was); }
  } restore;
  cuda::set_gemm_autotune(true);
  for (const GemmOutput output : {GemmOutput::kBf16, GemmOutput::kF32}) {
    const std::string name = output == GemmOutput::kBf16 ? "bf16" : "f32";
    GemmRunner runner;
    GemmShape s;
    s.m = 1000, s.n = 384, s.k = 512, s.trans_b = true, s.output = output;
    check_gemm(runner, s, 1.0f, 1.0f, 21, "tuned_" + name + "_beta1");  // built and timed here
    check_gemm(runner, s, 1.0f, 1.0f, 21, "tuned_" + name + "_beta1_again");
    check_gemm(runner, s, 0.5f, 0.0f, 22, "tuned_" + name + "_beta0");
    GemmShape w = s;  // a weight gradient: tokens as k, accumulated
    w.m = 384, w.n = 512, w.k = 1000, w.trans_a = true, w.trans_b = false;
    check_gemm(runner, w, 1.0f, 1.0f, 23, "tuned_" + name + "_dw");
    GemmShape batched = s;
    batched.m = 64, batched.n = 96, batched.k = 128, batched.batch = 3;
    batched.stride_a = 64 * 128 + 8, batched.stride_b = 128 * 96 + 16, batched.stride_d = 64 * 96 + 24;
    check_gemm(runner, batched, 1.0f, 1.0f, 24, "tuned_" + name + "_batched");
    GemmShape biased = s;
    biased.epilogue = GemmEpilogue::kBias;
    check_gemm(runner, biased, 1.0f, 0.0f, 25, "tuned_" + name + "_bias", true);
  }
  // A choice is the process's: another runner (another model or engine) takes it, the same bits.
  GemmShape s;
  s.m = 777, s.n = 640, s.k = 512, s.trans_b = true;
  Rng rng(26);
  DeviceBuffer<__nv_bfloat16> da = to_device_bf16(random_bf16_values(int64_t{s.m} * s.k, rng));
  DeviceBuffer<__nv_bfloat16> db = to_device_bf16(random_bf16_values(int64_t{s.k} * s.n, rng));
  std::vector<std::vector<float>> outs;
  for (int r = 0; r < 3; ++r) {
    GemmRunner runner;
    DeviceBuffer<__nv_bfloat16> dd(size_t(s.m) * s.n);
    runner.run(s, da.data(), db.data(), dd.data(), 1.0f, 0.0f, nullptr);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    outs.push_back(from_device_bf16(dd));
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[0], outs[2]);
}

TEST_F(GemmTest, InvalidShapeIsAnError) {
  GemmRunner runner;
  GemmShape s;
  s.m = 0, s.n = 8, s.k = 8;
  DeviceBuffer<__nv_bfloat16> a(64), b(64), d(64);
  try {
    runner.run(s, a.data(), b.data(), d.data(), 1.0f, 0.0f, nullptr);
    FAIL() << "a GEMM with m = 0 ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("m=0"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace pgolf::test
