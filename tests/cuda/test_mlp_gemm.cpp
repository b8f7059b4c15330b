// The fused MLP products (mlp_gemm.h) against the path they replace: the cuBLASLt product (bf16 out)
// followed by the separate activation pass (activation.h), on the same bf16 inputs.
//
// Bound. Both paths sum the same K = 512 products in fp32, in different orders, so each sum s is
// within γ·S of the exact one (γ = K·2⁻²⁴, S = Σ_k |a_k b_k|) and the two differ by Δ ≤ 2γS. Each is
// then rounded to bf16 (at most 2⁻⁸ relative, so the two roundings together add at most 2⁻⁷ of the
// larger magnitude): |pre_fused − pre_cublas| ≤ Δ + 2⁻⁷(1.01·|pre_cublas| + Δ). In the backward,
// dpre = bf16(dpost · f'(pre)) with f'(pre) exact in fp32 (2·pre or 2·slope²·pre, slope² = 0 or
// 1/4), so the dpost bound scales by |f'(pre)| and dpre's own rounding adds 2⁻⁷ of its magnitude.
// post must be exactly act(pre) of the fused kernel's own pre (the same fp32 operations).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cuda/activation.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/qk_norm_rope.h"
#include "core/error.h"
#include "core/half.h"
#include "op_test_util.h"

namespace pgolf::test {
namespace {

using cuda::DeviceBuffer;
using bf16 = __nv_bfloat16;

constexpr int kDim = 512;

class MlpGemmTest : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if (!cuda::mlp_fused_supported(kDim, 1024)) GTEST_SKIP() << "the fused MLP kernels need an sm_90 GPU";
  }
};

// S[i, j] = Σ_k |a[i, k]·b(k, j)|, b(k, j) = b[j·k_stride_j + k·k_stride_k].
std::vector<double> abs_product_sums(const std::vector<float>& a, const std::vector<float>& b, int rows, int cols,
                                     int64_t col_stride, int64_t k_stride) {
  std::vector<double> s(static_cast<size_t>(rows) * cols, 0.0);
  std::vector<double> b_abs(static_cast<size_t>(cols) * kDim);  // [cols, K]
  for (int j = 0; j < cols; ++j)
    for (int k = 0; k < kDim; ++k) b_abs[static_cast<size_t>(j) * kDim + k] = std::fabs(b[j * col_stride + k * k_stride]);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      double sum = 0.0;
      for (int k = 0; k < kDim; ++k) sum += std::fabs(a[static_cast<size_t>(i) * kDim + k]) * b_abs[static_cast<size_t>(j) * kDim + k];
      s[static_cast<size_t>(i) * cols + j] = sum;
    }
  return s;
}

// |x − y| allowed between the two paths' bf16 roundings of one product (the bound above).
double product_bound(double abs_sum, double cublas_value) {
  const double delta = 2.0 * kDim * std::ldexp(1.0, -24) * abs_sum;
  return delta + std::ldexp(1.0, -7) * (1.01 * std::fabs(cublas_value) + delta);
}

float leaky_sq(float x, float slope) {
  const float a = std::fmax(x, 0.f) + slope * std::fmin(x, 0.f);
  return round_to_bf16(a * a);
}

struct Case {
  int rows, hidden;
  float slope;
};

void check_forward(const Case& c) {
  SCOPED_TRACE("rows " + std::to_string(c.rows) + " hidden " + std::to_string(c.hidden) + " slope " +
               std::to_string(c.slope));
  Rng rng(900 + c.hidden + c.rows);
  const auto m = random_bf16_values(static_cast<size_t>(c.rows) * kDim, rng);
  const auto wfc = random_bf16_values(static_cast<size_t>(c.hidden) * kDim, rng, 1.0 / std::sqrt(kDim));
  auto d_m = to_device_bf16(m), d_w = to_device_bf16(wfc);
  const size_t n = static_cast<size_t>(c.rows) * c.hidden;
  auto pre_ref = poisoned_buffer<bf16>(n), post_ref = poisoned_buffer<bf16>(n);
  auto pre = poisoned_buffer<bf16>(n), post = poisoned_buffer<bf16>(n);
  cuda::GemmRunner gemm;
  cuda::linear_forward(gemm, d_m.data(), d_w.data(), pre_ref.data(), c.rows, kDim, c.hidden, nullptr);
  cuda::leaky_relu_sq_forward(pre_ref.data(), post_ref.data(), static_cast<int64_t>(n), c.slope, nullptr);
  cuda::mlp_fused_forward(d_m.data(), d_w.data(), pre.data(), post.data(), c.rows, kDim, c.hidden, c.slope, nullptr);
  sync_device();
  const auto got_pre = from_device_bf16(pre), got_post = from_device_bf16(post), want_pre = from_device_bf16(pre_ref);
  const auto abs_sums = abs_product_sums(m, wfc, c.rows, c.hidden, kDim, 1);  // Wfc [hidden, K]
  size_t bad_pre = 0, bad_post = 0, differing = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!(std::fabs(got_pre[i] - want_pre[i]) <= product_bound(abs_sums[i], want_pre[i]))) ++bad_pre;
    if (!(got_post[i] == leaky_sq(got_pre[i], c.slope))) ++bad_post;
    differing += got_pre[i] != want_pre[i];
  }
  EXPECT_EQ(bad_pre, 0u) << "pre outside the summation-order bound";
  EXPECT_EQ(bad_post, 0u) << "post is not act(pre)";
  EXPECT_LT(differing, n / 10) << "pre differs from cuBLAS's in more than a tenth of the elements";
}

void check_backward(const Case& c) {
  SCOPED_TRACE("rows " + std::to_string(c.rows) + " hidden " + std::to_string(c.hidden) + " slope " +
               std::to_string(c.slope));
  Rng rng(1900 + c.hidden + c.rows);
  const size_t n = static_cast<size_t>(c.rows) * c.hidden;
  const auto df = random_bf16_values(static_cast<size_t>(c.rows) * kDim, rng);
  const auto wproj = random_bf16_values(static_cast<size_t>(kDim) * c.hidden, rng, 1.0 / std::sqrt(kDim));
  const auto pre_values = random_bf16_values(n, rng);
  auto d_df = to_device_bf16(df), d_w = to_device_bf16(wproj), d_pre = to_device_bf16(pre_values);
  auto dpost_ref = poisoned_buffer<bf16>(n), dpre_ref = poisoned_buffer<bf16>(n), dpre = poisoned_buffer<bf16>(n);
  cuda::GemmRunner gemm;
  cuda::linear_backward_input(gemm, d_df.data(), d_w.data(), dpost_ref.data(), c.rows, c.hidden, kDim, nullptr);
  cuda::leaky_relu_sq_backward(dpost_ref.data(), d_pre.data(), dpre_ref.data(), static_cast<int64_t>(n), c.slope,
                               nullptr);
  cuda::mlp_fused_backward(d_df.data(), d_w.data(), d_pre.data(), dpre.data(), c.rows, kDim, c.hidden, c.slope,
                           nullptr);
  sync_device();
  const auto got = from_device_bf16(dpre), want = from_device_bf16(dpre_ref), dpost = from_device_bf16(dpost_ref);
  const auto abs_sums = abs_product_sums(df, wproj, c.rows, c.hidden, 1, c.hidden);  // Wproj [K, hidden]
  size_t bad = 0, differing = 0, nonzero = 0;
  for (size_t i = 0; i < n; ++i) {
    const double p = pre_values[i];
    const double grad = 2.0 * (p > 0 ? p : double(c.slope) * c.slope * p);  // |f'(pre)|, exact
    const double dpost_bound = std::fabs(grad) * product_bound(abs_sums[i], dpost[i]);
    const double bound = dpost_bound + std::ldexp(1.0, -7) * (1.01 * std::fabs(want[i]) + dpost_bound);
    if (!(std::fabs(got[i] - want[i]) <= bound)) ++bad;
    differing += got[i] != want[i];
    nonzero += got[i] != 0.f;
  }
  EXPECT_EQ(bad, 0u) << "dpre outside the summation-order bound";
  EXPECT_LT(differing, n / 10) << "dpre differs from cuBLAS + pass in more than a tenth of the elements";
  EXPECT_GT(nonzero, n / 3) << "too few nonzero gradients for a meaningful comparison";
}

// 200 rows: the last 128-row block has 72 (its second warpgroup 8); 300: 44 (the second warpgroup none).
// Hidden 640: five 128-column tiles, an odd number and none of the model sizes.
TEST_F(MlpGemmTest, ForwardMatchesCublasAndPassForEachHiddenSize) {
  for (const Case& c : {Case{200, 1024, 0.5f}, Case{200, 1536, 0.5f}, Case{200, 2048, 0.5f}, Case{300, 1536, 0.f},
                        Case{200, 640, 0.5f}})
    check_forward(c);
}

TEST_F(MlpGemmTest, BackwardMatchesCublasAndPassForEachHiddenSize) {
  for (const Case& c : {Case{200, 1024, 0.5f}, Case{200, 1536, 0.5f}, Case{200, 2048, 0.5f}, Case{300, 1536, 0.f},
                        Case{200, 640, 0.5f}})
    check_backward(c);
}

// The fused kernels' three outputs (pre, post and, with the same weights read as Wproj, dpre) for one
// case's random inputs, under one schedule and one cut of the hidden tiles.
struct FusedInputs {
  DeviceBuffer<bf16> a, w, pre_in;
  FusedInputs(const Case& c, uint64_t seed) {
    Rng rng(seed);
    a = to_device_bf16(random_bf16_values(static_cast<size_t>(c.rows) * kDim, rng));
    w = to_device_bf16(random_bf16_values(static_cast<size_t>(c.hidden) * kDim, rng, 1.0 / std::sqrt(kDim)));
    pre_in = to_device_bf16(random_bf16_values(static_cast<size_t>(c.rows) * c.hidden, rng));
  }
};

std::vector<std::vector<float>> fused_outputs(const FusedInputs& in, const Case& c, cuda::MlpSchedule schedule,
                                              int splits) {
  const size_t n = static_cast<size_t>(c.rows) * c.hidden;
  auto pre = poisoned_buffer<bf16>(n), post = poisoned_buffer<bf16>(n), dpre = poisoned_buffer<bf16>(n);
  cuda::mlp_fused_forward(in.a.data(), in.w.data(), pre.data(), post.data(), c.rows, kDim, c.hidden, c.slope, nullptr,
                          schedule, splits);
  cuda::mlp_fused_backward(in.a.data(), in.w.data(), in.pre_in.data(), dpre.data(), c.rows, kDim, c.hidden, c.slope,
                           nullptr, schedule, splits);
  sync_device();
  return {from_device_bf16(pre), from_device_bf16(post), from_device_bf16(dpre)};
}

// Every bit of the three outputs agrees, and they are not mostly zeros (else nothing was compared).
void expect_same_bits(const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& want,
                      const std::string& what) {
  for (size_t i = 0; i < 3; ++i) {
    size_t differing = 0, nonzero = 0;
    for (size_t e = 0; e < want[i].size(); ++e) {
      differing += std::memcmp(&got[i][e], &want[i][e], sizeof(float)) != 0;
      nonzero += want[i][e] != 0.f;
    }
    const char* name = i == 0 ? "pre" : i == 1 ? "post" : "dpre";
    EXPECT_EQ(differing, 0u) << name << " differs " << what;
    EXPECT_GT(nonzero, want[i].size() / 3) << name << " mostly zeros: nothing meaningful compared";
  }
}

// Cutting the hidden tiles into runs of their own CTAs (hidden_splits) computes every tile alike: the
// same bits for any count, 0 (chosen) included, in both schedules. 640 = 5 tiles in runs of 3 and 2; 1536
// = 12 tiles in 4 runs of 3 (a count of 5 gives those runs too); 300 rows: a partial last block.
TEST_F(MlpGemmTest, HiddenSplitsAreBitIdentical) {
  struct SplitCase {
    Case c;
    std::vector<int> splits;
  };
  for (const SplitCase& sc : {SplitCase{Case{300, 640, 0.5f}, {2, 5, 0}}, SplitCase{Case{1000, 1536, 0.5f}, {4, 5, 12, 0}},
                              SplitCase{Case{256, 2048, 0.f}, {16, 0}}}) {
    SCOPED_TRACE("rows " + std::to_string(sc.c.rows) + " hidden " + std::to_string(sc.c.hidden));
    const FusedInputs in(sc.c, 2950 + sc.c.hidden + sc.c.rows);
    for (const auto schedule : {cuda::MlpSchedule::resident_a, cuda::MlpSchedule::streamed_operands}) {
      const auto reference = fused_outputs(in, sc.c, schedule, 1);  // one run of all tiles
      for (int splits : sc.splits)
        expect_same_bits(fused_outputs(in, sc.c, schedule, splits), reference,
                         "with " + std::to_string(splits) + " runs from one run of all tiles");
    }
  }
  auto a = to_device_bf16(std::vector<float>(64 * kDim, 0.f));
  auto w = to_device_bf16(std::vector<float>(1024 * kDim, 0.f));
  auto out = poisoned_buffer<bf16>(64 * 1024), post = poisoned_buffer<bf16>(64 * 1024);
  EXPECT_THROW(cuda::mlp_fused_forward(a.data(), w.data(), out.data(), post.data(), 64, kDim, 1024, 0.5f, nullptr,
                                       cuda::MlpSchedule::resident_a, 9),
               Error);
}

// The chosen count: one run of all tiles for the training and evaluation batches (98,304 and 65,536 rows
// at hidden 1536 / 2048 / 1024, 132 SMs), several where the row blocks leave most SMs idle.
TEST(MlpGemmSplits, ChosenCountKeepsLargeBatchesWhole) {
  for (int64_t rows : {int64_t{98304}, int64_t{65536}})
    for (int hidden : {1024, 1536, 2048}) EXPECT_EQ(cuda::mlp_fused_hidden_splits(rows, hidden, 132), 1) << rows << " " << hidden;
  EXPECT_EQ(cuda::mlp_fused_hidden_splits(2048, 2048, 132), 8);   // 16 row blocks: 128 CTAs of 2 tiles
  EXPECT_EQ(cuda::mlp_fused_hidden_splits(18432, 2048, 132), 2);  // 144 row blocks: 3 waves of 8 tiles
  EXPECT_EQ(cuda::mlp_fused_hidden_splits(36864, 2048, 132), 2);  // 288: 5 waves of 8 against 3 of 16
  EXPECT_EQ(cuda::mlp_fused_hidden_splits(36864, 1024, 132), 1);  // 288: a tie, so one run
  EXPECT_EQ(cuda::mlp_fused_hidden_splits(128, 1536, 132), 12);   // 2 row blocks (a cluster): a tile each
}

// The two schedules issue the same MMAs in the same order and share the epilogue: every output bit
// must agree. 300 rows: a partial last block whose second warpgroup has no rows; 640: five tiles, so
// the 6 streamed stages wrap around mid-tile.
TEST_F(MlpGemmTest, StreamedOperandsScheduleIsBitIdenticalToResidentA) {
  for (const Case& c : {Case{300, 640, 0.5f}, Case{1000, 1536, 0.5f}, Case{256, 2048, 0.f}}) {
    SCOPED_TRACE("rows " + std::to_string(c.rows) + " hidden " + std::to_string(c.hidden));
    const FusedInputs in(c, 2900 + c.hidden + c.rows);
    expect_same_bits(fused_outputs(in, c, cuda::MlpSchedule::streamed_operands, 1),
                     fused_outputs(in, c, cuda::MlpSchedule::resident_a, 1), "between the schedules");
  }
}

TEST_F(MlpGemmTest, RejectsShapesItDoesNotServe) {
  EXPECT_FALSE(cuda::mlp_fused_supported(256, 1024));
  EXPECT_FALSE(cuda::mlp_fused_supported(kDim, 1000));
  EXPECT_TRUE(cuda::mlp_fused_supported(kDim, 1536));
  DeviceBuffer<bf16> a(64 * 256), w(256 * 1000), out(64 * 1000), post(64 * 1000);
  EXPECT_THROW(cuda::mlp_fused_forward(a.data(), w.data(), out.data(), post.data(), 64, 256, 1024, 0.5f, nullptr),
               Error);
  EXPECT_THROW(cuda::mlp_fused_backward(a.data(), w.data(), out.data(), post.data(), 64, kDim, 1000, 0.5f, nullptr),
               Error);
}

// ---- The QKV product with QK-norm, RoPE and the q gain in its epilogue (qkv_fused_forward) ----------

struct QkvCase {
  int rows, heads, kv_heads, rope_dims, seq_len;
};

struct QkvInputs {
  QkvCase c;
  int cols;
  std::vector<float> n, w;
  DeviceBuffer<bf16> d_n, d_w;
  DeviceBuffer<float> gain, cos, sin;
  cuda::QkShape shape() const { return {c.rows, c.seq_len, c.heads, c.kv_heads, 64, c.rope_dims}; }
  QkvInputs(const QkvCase& c_, uint64_t seed) : c(c_), cols((c_.heads + 2 * c_.kv_heads) * 64) {
    Rng rng(seed);
    n = random_bf16_values(static_cast<size_t>(c.rows) * kDim, rng);
    w = random_bf16_values(static_cast<size_t>(cols) * kDim, rng, 1.0 / std::sqrt(kDim));
    d_n = to_device_bf16(n), d_w = to_device_bf16(w);
    gain = DeviceBuffer<float>(params_near(static_cast<size_t>(c.heads), rng, 1.5, 0.5), "gain");
    // Any table: the epilogue must apply the one it is given exactly as the separate pass does.
    const size_t table = static_cast<size_t>(c.seq_len) * std::max(1, c.rope_dims / 2);
    cos = DeviceBuffer<float>(random_f32_values(table, rng, 0.7), "cos");
    sin = DeviceBuffer<float>(random_f32_values(table, rng, 0.7), "sin");
  }
};

struct QkvOutputs {
  std::vector<float> qkv, q, k, q_rstd, k_rstd;
};

QkvOutputs qkv_fused_outputs(const QkvInputs& in, bool write_qk_lin, cuda::MlpSchedule schedule, int splits) {
  const QkvCase& c = in.c;
  auto qkv = poisoned_buffer<bf16>(static_cast<size_t>(c.rows) * in.cols);
  auto q = poisoned_buffer<bf16>(static_cast<size_t>(c.rows) * c.heads * 64);
  auto k = poisoned_buffer<bf16>(static_cast<size_t>(c.rows) * c.kv_heads * 64);
  auto q_rstd = poisoned_buffer<float>(static_cast<size_t>(c.rows) * c.heads);
  auto k_rstd = poisoned_buffer<float>(static_cast<size_t>(c.rows) * c.kv_heads);
  cuda::qkv_fused_forward(in.d_n.data(), in.d_w.data(), qkv.data(), write_qk_lin, in.gain.data(), in.cos.data(),
                          in.sin.data(), q.data(), k.data(), q_rstd.data(), k_rstd.data(), in.shape(), kDim, nullptr,
                          schedule, splits);
  sync_device();
  return {from_device_bf16(qkv), from_device_bf16(q), from_device_bf16(k), q_rstd.download(), k_rstd.download()};
}

size_t differing_bits(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  size_t differing = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) differing += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return differing;
}

// qkv within the summation-order bound of cuBLASLt's product; q, k and the rstds exactly what
// qk_norm_rope_forward makes of the fused kernel's own qkv; without the q and k columns of qkv the same
// q, k, rstds and v columns, and qkv's q and k columns untouched. 300 rows: a partial last row block;
// s691's heads (8 q, 4 kv, RoPE on 16 of 64), the baseline's (RoPE on all 64), none, and 6 + 2 heads
// (q in three tiles) with RoPE on 32.
TEST_F(MlpGemmTest, QkvProductWithQkNormRopeMatchesTheSeparatePasses) {
  for (const QkvCase& c : {QkvCase{300, 8, 4, 16, 128}, QkvCase{200, 8, 4, 64, 64}, QkvCase{256, 4, 2, 0, 100},
                           QkvCase{1000, 6, 2, 32, 1000}}) {
    SCOPED_TRACE("rows " + std::to_string(c.rows) + " heads " + std::to_string(c.heads) + "/" +
                 std::to_string(c.kv_heads) + " rope " + std::to_string(c.rope_dims));
    ASSERT_TRUE(cuda::qkv_fused_supported(kDim, cuda::QkShape{c.rows, c.seq_len, c.heads, c.kv_heads, 64, c.rope_dims}));
    const QkvInputs in(c, 3100 + c.rows + c.heads);
    const QkvOutputs got = qkv_fused_outputs(in, true, cuda::MlpSchedule::resident_a, 0);

    // The product against cuBLASLt's.
    auto qkv_ref = poisoned_buffer<bf16>(got.qkv.size());
    cuda::GemmRunner gemm;
    cuda::linear_forward(gemm, in.d_n.data(), in.d_w.data(), qkv_ref.data(), c.rows, kDim, in.cols, nullptr);
    sync_device();
    const auto want_qkv = from_device_bf16(qkv_ref);
    const auto abs_sums = abs_product_sums(in.n, in.w, c.rows, in.cols, kDim, 1);
    size_t bad = 0, differing = 0;
    for (size_t i = 0; i < want_qkv.size(); ++i) {
      if (!(std::fabs(got.qkv[i] - want_qkv[i]) <= product_bound(abs_sums[i], want_qkv[i]))) ++bad;
      differing += got.qkv[i] != want_qkv[i];
    }
    EXPECT_EQ(bad, 0u) << "qkv outside the summation-order bound";
    EXPECT_LT(differing, want_qkv.size() / 10) << "qkv differs from cuBLAS's in more than a tenth of the elements";

    // The separate pass on the fused kernel's qkv.
    const auto qkv_dev = to_device_bf16(got.qkv);
    auto q = poisoned_buffer<bf16>(got.q.size()), k = poisoned_buffer<bf16>(got.k.size());
    auto q_rstd = poisoned_buffer<float>(got.q_rstd.size()), k_rstd = poisoned_buffer<float>(got.k_rstd.size());
    cuda::qk_norm_rope_forward(qkv_dev.data(), qkv_dev.data() + c.heads * 64, in.cols, in.gain.data(), in.cos.data(),
                               in.sin.data(), q.data(), k.data(), q_rstd.data(), k_rstd.data(), in.shape(), nullptr);
    sync_device();
    EXPECT_EQ(differing_bits(got.q, from_device_bf16(q)), 0u) << "q";
    EXPECT_EQ(differing_bits(got.k, from_device_bf16(k)), 0u) << "k";
    EXPECT_EQ(differing_bits(got.q_rstd, q_rstd.download()), 0u) << "q_rstd";
    EXPECT_EQ(differing_bits(got.k_rstd, k_rstd.download()), 0u) << "k_rstd";
    size_t nonzero = 0;
    for (float x : got.q) nonzero += x != 0.f && std::isfinite(x);
    EXPECT_GT(nonzero, got.q.size() / 2) << "q mostly zeros or unwritten: nothing meaningful compared";

    // Without qkv's q and k columns.
    const QkvOutputs lean = qkv_fused_outputs(in, false, cuda::MlpSchedule::resident_a, 0);
    EXPECT_EQ(differing_bits(lean.q, got.q) + differing_bits(lean.k, got.k), 0u) << "q, k without qkv's q and k";
    EXPECT_EQ(differing_bits(lean.q_rstd, got.q_rstd) + differing_bits(lean.k_rstd, got.k_rstd), 0u);
    size_t v_differing = 0, qk_written = 0;
    const int qk_cols = (c.heads + c.kv_heads) * 64;
    for (int r = 0; r < c.rows; ++r)
      for (int col = 0; col < in.cols; ++col) {
        const size_t i = static_cast<size_t>(r) * in.cols + col;
        if (col < qk_cols) qk_written += !std::isnan(lean.qkv[i]);
        else v_differing += std::memcmp(&lean.qkv[i], &got.qkv[i], sizeof(float)) != 0;
      }
    EXPECT_EQ(v_differing, 0u) << "v's columns";
    EXPECT_EQ(qk_written, 0u) << "q and k columns of qkv written although write_qk_lin is false";

    // The other schedule and cuts of the tiles: the same bits.
    for (const auto& [schedule, splits] : {std::pair{cuda::MlpSchedule::streamed_operands, 1},
                                          std::pair{cuda::MlpSchedule::resident_a, 3}}) {
      const QkvOutputs other = qkv_fused_outputs(in, true, schedule, splits);
      EXPECT_EQ(differing_bits(other.qkv, got.qkv) + differing_bits(other.q, got.q) + differing_bits(other.k, got.k) +
                    differing_bits(other.q_rstd, got.q_rstd) + differing_bits(other.k_rstd, got.k_rstd),
                0u)
          << "schedule " << static_cast<int>(schedule) << ", " << splits << " runs";
    }
  }
}

TEST_F(MlpGemmTest, QkvProductRejectsShapesItDoesNotServe) {
  EXPECT_TRUE(cuda::qkv_fused_supported(kDim, cuda::QkShape{0, 2048, 8, 4, 64, 16}));
  EXPECT_FALSE(cuda::qkv_fused_supported(256, cuda::QkShape{0, 2048, 8, 4, 64, 16}));  // dim
  EXPECT_FALSE(cuda::qkv_fused_supported(kDim, cuda::QkShape{0, 2048, 8, 4, 32, 16}));  // head_dim
  EXPECT_FALSE(cuda::qkv_fused_supported(kDim, cuda::QkShape{0, 2048, 7, 4, 64, 16}));  // odd heads
  EXPECT_FALSE(cuda::qkv_fused_supported(kDim, cuda::QkShape{0, 2048, 8, 3, 64, 16}));  // odd kv heads
  EXPECT_FALSE(cuda::qkv_fused_supported(kDim, cuda::QkShape{0, 2048, 8, 4, 64, 24}));  // RoPE partners apart
  EXPECT_FALSE(cuda::qkv_fused_supported(kDim, cuda::QkShape{0, 2048, 8, 4, 64, 48}));  // 24 apart
  DeviceBuffer<bf16> a(64 * kDim), w(1024 * kDim), qkv(64 * 1024), q(64 * 512), k(64 * 256);
  DeviceBuffer<float> rstd(64 * 8), gain(8), table(2048 * 12);
  EXPECT_THROW(cuda::qkv_fused_forward(a.data(), w.data(), qkv.data(), true, gain.data(), table.data(), table.data(),
                                       q.data(), k.data(), rstd.data(), rstd.data(), cuda::QkShape{64, 2048, 8, 4, 64, 24},
                                       kDim, nullptr),
               Error);
}

}  // namespace
}  // namespace pgolf::test
