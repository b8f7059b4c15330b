// Lookups, hashes, activations, scalar adds, the bf16 weight refresh (with late-QAT fake quant) and
// the soft-capped cross-entropy against their CPU twins (cpu/embedding.h, cpu/ngram_hash.h,
// cpu/activation.h, cpu/mixing.h, cpu/fake_quant.h, cpu/softcap_ce.h), tolerance rule of op_test_util.h.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "backend/cpu/activation.h"
#include "backend/cpu/embedding.h"
#include "backend/cpu/fake_quant.h"
#include "backend/cpu/mixing.h"
#include "backend/cpu/ngram_hash.h"
#include "backend/cpu/softcap_ce.h"
#include "backend/cuda/activation.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/embedding.h"
#include "backend/cuda/ngram_hash.h"
#include "backend/cuda/softcap_ce.h"
#include "backend/cuda/weights.h"
#include "op_test_util.h"

namespace pgolf::test {
namespace {

using cuda::DeviceBuffer;
using bf16 = __nv_bfloat16;

class ElementwiseOpsTest : public CudaTest {};

std::vector<int32_t> random_ids(int64_t n, int vocab, Rng& rng) {
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  return ids;
}

TEST_F(ElementwiseOpsTest, EmbeddingSumsAndScatterAdd) {
  const int64_t n = 333;
  const int rows = 50, rows2 = 29, dim = 40;  // few rows: many repeated ids in the backward
  Rng rng(700);
  const auto table = random_bf16_values(rows * dim, rng), table2 = random_bf16_values(rows2 * dim, rng);
  const auto dense = random_bf16_values(n * dim, rng);
  const std::vector<float> scale{0.37f};
  const auto ids = random_ids(n, rows, rng), ids2 = random_ids(n, rows2, rng);
  // tok[ids] + table2[ids2] + scale·dense
  std::vector<double> ref(n * dim);
  std::vector<float> naive(n * dim);
  cpu::embedding_forward<double>(ids.data(), n, to_double(table).data(), rows, dim, ref.data());
  cpu::embedding_forward<double>(ids2.data(), n, to_double(table2).data(), rows2, dim, ref.data(), true);
  cpu::scaled_add_forward<double>(to_double(dense).data(), scale[0], ref.data(), n * dim, true);
  cpu::embedding_forward<float>(ids.data(), n, table.data(), rows, dim, naive.data());
  cpu::embedding_forward<float>(ids2.data(), n, table2.data(), rows2, dim, naive.data(), true);
  cpu::scaled_add_forward<float>(dense.data(), scale[0], naive.data(), n * dim, true);
  DeviceBuffer<int32_t> d_ids(ids), d_ids2(ids2);
  auto d_table = to_device_bf16(table), d_table2 = to_device_bf16(table2), d_dense = to_device_bf16(dense);
  DeviceBuffer<float> d_scale(scale);
  auto out = poisoned_buffer<bf16>(n * dim);
  cuda::EmbeddingAddends add;
  add.ids2 = d_ids2.data(), add.table2 = d_table2.data(), add.dense = d_dense.data(), add.dense_scale = d_scale.data();
  cuda::embedding_forward(d_ids.data(), d_table.data(), n, dim, out.data(), add, nullptr);
  sync_device();
  expect_within_naive("embedding_sum", from_device_bf16(out), rounded_bf16(naive), ref, kBf16Bound);

  // A plain lookup is exact.
  auto plain = poisoned_buffer<bf16>(n * dim);
  cuda::embedding_forward(d_ids.data(), d_table.data(), n, dim, plain.data(), cuda::EmbeddingAddends{}, nullptr);
  sync_device();
  const auto got_plain = from_device_bf16(plain);
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < dim; ++j) ASSERT_EQ(got_plain[i * dim + j], table[ids[i] * dim + j]) << i << "," << j;

  const auto dout = random_f32_values(n * dim, rng), dtable_init = random_f32_values(rows * dim, rng);
  std::vector<double> dref(dtable_init.begin(), dtable_init.end());
  std::vector<float> dnaive = dtable_init;
  cpu::embedding_backward<double>(ids.data(), n, to_double(dout).data(), dim, dref.data());
  cpu::embedding_backward<float>(ids.data(), n, dout.data(), dim, dnaive.data());
  DeviceBuffer<float> d_dout(dout), d_dtable(dtable_init);
  cuda::embedding_backward(d_ids.data(), n, d_dout.data(), dim, d_dtable.data(), nullptr);
  sync_device();
  expect_within_naive("embedding_backward", d_dtable.download(), dnaive, dref, kF32Bound);

  // The sorted (deterministic) scatter-add: the same bound, and the same bits on a second run.
  const size_t ws_bytes = cuda::embedding_sort_workspace_bytes(n);
  auto ws = poisoned_buffer<unsigned char>(ws_bytes);
  std::vector<std::vector<float>> sorted;
  for (int run = 0; run < 2; ++run) {
    DeviceBuffer<float> d_sorted(dtable_init);
    cuda::embedding_backward_sorted(d_ids.data(), n, d_dout.data(), dim, d_sorted.data(), rows, ws.data(), ws_bytes,
                                    nullptr);
    sync_device();
    sorted.push_back(d_sorted.download());
  }
  expect_within_naive("embedding_backward_sorted", sorted[0], dnaive, dref, kF32Bound);
  EXPECT_EQ(sorted[0], sorted[1]) << "the sorted scatter-add differs between two runs";
}

TEST_F(ElementwiseOpsTest, NgramIndicesEqualTheCpuRules) {
  const int64_t rows = 3, seq_len = 129;
  Rng rng(710);
  const auto ids = random_ids(rows * seq_len, 8192, rng);
  DeviceBuffer<int32_t> d_ids(ids);
  for (const int buckets : {2, 2048, 10240}) {
    std::vector<int32_t> bi(ids.size()), tri(ids.size());
    cpu::bigram_hash_indices(ids.data(), rows, seq_len, buckets, bi.data());
    cpu::trigram_hash_indices(ids.data(), rows, seq_len, buckets, tri.data());
    auto d_bi = poisoned_buffer<int32_t>(ids.size()), d_tri = poisoned_buffer<int32_t>(ids.size());
    cuda::bigram_hash_indices(d_ids.data(), rows, seq_len, buckets, d_bi.data(), nullptr);
    cuda::trigram_hash_indices(d_ids.data(), rows, seq_len, buckets, d_tri.data(), nullptr);
    sync_device();
    EXPECT_EQ(d_bi.download(), bi) << "bigram, " << buckets << " buckets";
    EXPECT_EQ(d_tri.download(), tri) << "trigram, " << buckets << " buckets";
  }
  std::vector<int32_t> direct(ids.size());
  cpu::direct_bigram_indices(ids.data(), rows, seq_len, 8192, 2048, direct.data());
  auto d_direct = poisoned_buffer<int32_t>(ids.size());
  cuda::direct_bigram_indices(d_ids.data(), rows, seq_len, 8192, 2048, d_direct.data(), nullptr);
  sync_device();
  EXPECT_EQ(d_direct.download(), direct);
}

TEST_F(ElementwiseOpsTest, ReluSquaredAndLeakySquared) {
  const int64_t n = 8 * 4099;
  Rng rng(720);
  const auto pre = random_bf16_values(n, rng, 2.0), dpost = random_bf16_values(n, rng);
  for (const float slope : {0.f, 0.5f}) {
    const std::string tag = slope == 0.f ? "relu2" : "leaky2";
    std::vector<double> post_ref(n), dpre_ref(n, 0.0);
    std::vector<float> post_naive(n), dpre_naive(n, 0.f);
    cpu::leaky_relu_sq_forward<double>(to_double(pre).data(), post_ref.data(), n, slope);
    cpu::leaky_relu_sq_forward<float>(pre.data(), post_naive.data(), n, slope);
    cpu::leaky_relu_sq_backward<double>(to_double(dpost).data(), to_double(pre).data(), dpre_ref.data(), n, slope);
    cpu::leaky_relu_sq_backward<float>(dpost.data(), pre.data(), dpre_naive.data(), n, slope);
    auto d_pre = to_device_bf16(pre), d_dpost = to_device_bf16(dpost);
    auto post = poisoned_buffer<bf16>(n), dpre = poisoned_buffer<bf16>(n);
    cuda::leaky_relu_sq_forward(d_pre.data(), post.data(), n, slope, nullptr);
    cuda::leaky_relu_sq_backward(d_dpost.data(), d_pre.data(), dpre.data(), n, slope, nullptr);
    sync_device();
    expect_within_naive(tag + "_post", from_device_bf16(post), rounded_bf16(post_naive), post_ref, kBf16Bound);
    expect_within_naive(tag + "_dpre", from_device_bf16(dpre), rounded_bf16(dpre_naive), dpre_ref, kBf16Bound);
  }
}

TEST_F(ElementwiseOpsTest, ScaledAddAndF32Add) {
  const int64_t n = 8 * 5003;
  Rng rng(730);
  const auto x = random_bf16_values(n, rng), y0 = random_bf16_values(n, rng);
  const std::vector<float> s{-0.61f};
  for (const bool accumulate : {false, true}) {
    std::vector<double> ref(n, 0.0);
    std::vector<float> naive(n, 0.f);
    if (accumulate) ref = to_double(y0), naive = y0;
    cpu::scaled_add_forward<double>(to_double(x).data(), s[0], ref.data(), n, accumulate);
    cpu::scaled_add_forward<float>(x.data(), s[0], naive.data(), n, accumulate);
    auto d_x = to_device_bf16(x);
    auto d_y = accumulate ? to_device_bf16(y0) : poisoned_buffer<bf16>(n);
    DeviceBuffer<float> d_s(s);
    cuda::scaled_add_forward(d_x.data(), d_s.data(), d_y.data(), n, accumulate, nullptr);
    sync_device();
    expect_within_naive(accumulate ? "scaled_add_acc" : "scaled_add", from_device_bf16(d_y), rounded_bf16(naive), ref,
                        kBf16Bound);
  }
  const auto dy = random_f32_values(n, rng);
  const std::vector<float> ds_init{0.25f};
  std::vector<double> dx_ref(n, 0.0), ds_ref(ds_init.begin(), ds_init.end());
  std::vector<float> dx_naive(n, 0.f), ds_naive = ds_init;
  cpu::scaled_add_backward<double>(to_double(dy).data(), to_double(x).data(), s[0], dx_ref.data(), ds_ref.data(), n);
  cpu::scaled_add_backward<float>(dy.data(), x.data(), s[0], dx_naive.data(), ds_naive.data(), n);
  auto d_x = to_device_bf16(x);
  DeviceBuffer<float> d_dy(dy), d_s(s), d_ds(ds_init);
  auto d_dx = poisoned_buffer<bf16>(n);
  TestWorkspace tw(static_cast<size_t>(cuda::elementwise_blocks(n)));
  cuda::scaled_add_backward(d_dy.data(), d_x.data(), d_s.data(), d_dx.data(), d_ds.data(), n, tw.ws, nullptr);
  sync_device();
  expect_within_naive("scaled_add_dx", from_device_bf16(d_dx), rounded_bf16(dx_naive), dx_ref, kBf16Bound);
  expect_within_naive("scaled_add_ds", d_ds.download(), ds_naive, ds_ref, kF32Bound);

  const auto a = random_f32_values(n, rng), b = random_f32_values(n, rng);
  std::vector<float> sum(n);
  for (int64_t i = 0; i < n; ++i) sum[i] = a[i] + b[i];
  DeviceBuffer<float> d_a(a), d_b(b);
  cuda::add_f32(d_a.data(), d_b.data(), n, nullptr);
  sync_device();
  EXPECT_EQ(d_a.download(), sum) << "an fp32 add is exact";
}

// The refresh is a cast, or the fake quantization of cpu/fake_quant.h followed by a cast: both are
// exact fp32 operations the GPU performs identically (IEEE division, rint, clamp, one product), so
// the bf16 copies must equal the CPU's bit for bit.
TEST_F(ElementwiseOpsTest, WeightRefreshCastsAndFakeQuantizesRows) {
  Rng rng(740);
  std::vector<float> params = random_f32_values(7 + 37 * 72 + 5 + 16 * 40, rng, 0.05);
  for (int j = 0; j < 72; ++j) params[7 + 3 * 72 + j] *= 100.f;  // one row with a large range
  for (int j = 0; j < 72; ++j) params[7 + 4 * 72 + j] *= 1e-4f;  // one row under the 1/31 scale floor
  const int64_t m1 = 7, m2 = 7 + 37 * 72 + 5;
  std::vector<cuda::WeightCopy> table = {{m1, 0, 0, 37, 72, true}, {m2, 37 * 72 + 8, 37, 16, 40, false}};
  DeviceBuffer<float> d_params(params);
  DeviceBuffer<cuda::WeightCopy> d_table(table);
  const int64_t out_count = 37 * 72 + 8 + 16 * 40;
  for (const bool quantize : {false, true}) {
    auto out = poisoned_buffer<bf16>(out_count);
    cuda::refresh_bf16_weights(d_params.data(), out.data(), d_table.data(), 2, 53, quantize, nullptr);
    sync_device();
    const auto got = from_device_bf16(out);
    std::vector<float> q(37 * 72);
    cpu::fake_quant_int6_rows<float>(params.data() + m1, q.data(), 37, 72);
    for (int64_t i = 0; i < 37 * 72; ++i)
      ASSERT_EQ(got[i], round_to_bf16(quantize ? q[i] : params[m1 + i])) << "matrix 1 element " << i;
    for (int64_t i = 0; i < 16 * 40; ++i)
      ASSERT_EQ(got[37 * 72 + 8 + i], round_to_bf16(params[m2 + i])) << "matrix 2 (never quantized) element " << i;
  }
}

TEST_F(ElementwiseOpsTest, SoftcapCrossEntropyForwardBackward) {
  struct CeCase {
    int64_t n;
    int vocab;
  };
  // Rows of 1,024 / 8,192 / 64 logits take the block-per-row kernel, 40,000 the warp-per-row one.
  for (const CeCase c : {CeCase{133, 1024}, CeCase{37, 8192}, CeCase{3001, 64}, CeCase{5, 40000}}) {
    const std::string tag = std::to_string(c.n) + "x" + std::to_string(c.vocab);
    SCOPED_TRACE(tag);
    const float cap = 30.f;
    Rng rng(750 + c.vocab);
    const auto z = random_bf16_values(c.n * c.vocab, rng, 12.0);  // some logits deep in tanh's saturation
    const auto targets = random_ids(c.n, c.vocab, rng);
    std::vector<double> capped_ref(z.size()), loss_ref(c.n), lse_ref(c.n);
    std::vector<float> capped_naive(z.size()), loss_naive(c.n), lse_naive(c.n);
    cpu::softcap_ce_forward<double>(to_double(z).data(), capped_ref.data(), targets.data(), loss_ref.data(),
                                    lse_ref.data(), c.n, c.vocab, cap);
    cpu::softcap_ce_forward<float>(z.data(), capped_naive.data(), targets.data(), loss_naive.data(), lse_naive.data(),
                                   c.n, c.vocab, cap);
    auto d_z = to_device_bf16(z);
    DeviceBuffer<int32_t> d_t(targets);
    auto loss = poisoned_buffer<float>(c.n), lse = poisoned_buffer<float>(c.n), mean = poisoned_buffer<float>(1);
    cuda::softcap_ce_forward(d_z.data(), d_t.data(), loss.data(), lse.data(), c.n, c.vocab, cap, nullptr);
    cuda::mean_loss(loss.data(), c.n, mean.data(), nullptr);
    sync_device();
    const std::vector<float> losses = loss.download();
    expect_within_naive(tag + "_loss", losses, loss_naive, loss_ref, kF32Bound);
    expect_within_naive(tag + "_lse", lse.download(), lse_naive, lse_ref, kF32Bound);
    // The mean of the device's own losses: its error is the reduction's alone.
    double mean_ref = 0;
    float mean_naive = 0;
    for (int64_t i = 0; i < c.n; ++i) mean_ref += losses[i], mean_naive += losses[i];
    expect_within_naive(tag + "_mean", mean.download(), std::vector<float>{mean_naive / c.n},
                        std::vector<double>{mean_ref / c.n}, kF32Bound);

    // Backward with per-token weights and with the uniform weight (weights null), from the shared lse.
    const auto w = params_near(c.n, rng, 0.5, 0.2);
    for (const bool uniform : {false, true}) {
      std::vector<float> wv = uniform ? std::vector<float>(c.n, 1.f / c.n) : w;
      std::vector<double> dz_ref(z.size());
      std::vector<float> dz_naive(z.size());
      std::vector<double> capped_lse(lse_naive.begin(), lse_naive.end());
      cpu::softcap_ce_backward<double>(capped_ref.data(), capped_lse.data(), targets.data(), to_double(wv).data(),
                                       dz_ref.data(), c.n, c.vocab, cap);
      cpu::softcap_ce_backward<float>(capped_naive.data(), lse_naive.data(), targets.data(), wv.data(),
                                      dz_naive.data(), c.n, c.vocab, cap);
      DeviceBuffer<float> d_lse(lse_naive), d_w(w);
      auto dz = poisoned_buffer<bf16>(z.size());
      cuda::softcap_ce_backward(d_z.data(), d_lse.data(), d_t.data(), uniform ? nullptr : d_w.data(), 1.f / c.n,
                                dz.data(), c.n, c.vocab, cap, nullptr);
      sync_device();
      const std::vector<float> dz_separate = from_device_bf16(dz);
      expect_within_naive(tag + (uniform ? "_dz_uniform" : "_dz"), dz_separate, rounded_bf16(dz_naive), dz_ref,
                          kBf16Bound);

      // The forward that forms dz too (in place over a copy of z): the same losses and lse as the plain
      // forward, and the separate backward's dz from that lse, bit for bit.
      auto z_inout = to_device_bf16(z);
      auto loss2 = poisoned_buffer<float>(c.n), lse2 = poisoned_buffer<float>(c.n);
      const cuda::CeGradient grad{z_inout.data(), uniform ? nullptr : d_w.data(), 1.f / c.n};
      cuda::softcap_ce_forward(z_inout.data(), d_t.data(), loss2.data(), lse2.data(), c.n, c.vocab, cap, nullptr,
                               &grad);
      DeviceBuffer<float> d_lse_dev(lse.download());
      cuda::softcap_ce_backward(d_z.data(), d_lse_dev.data(), d_t.data(), uniform ? nullptr : d_w.data(), 1.f / c.n,
                                dz.data(), c.n, c.vocab, cap, nullptr);
      sync_device();
      const auto same_bits = [&](const char* what, const std::vector<float>& a, const std::vector<float>& b) {
        ASSERT_EQ(a.size(), b.size()) << what;
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << what << (uniform ? " (uniform)" : "");
      };
      same_bits("fused forward: losses", loss2.download(), losses);
      same_bits("fused forward: lse", lse2.download(), lse.download());
      same_bits("fused forward: dz", from_device_bf16(z_inout), from_device_bf16(dz));
    }
  }
}

}  // namespace
}  // namespace pgolf::test
