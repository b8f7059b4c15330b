// The dQ finish folded into qk_norm_rope_backward (attention_backward_unfinished + QkDq from the fp32
// sum) against the separate path (attention_backward's finish pass writes bf16 dq, which
// qk_norm_rope_backward reads back): the same bits, for dense rows and for documents, after the
// wgmma backward (scale 1/8 left to the finish) and the mma.sync one (scale 1).
//
// The dQ sums come from fp32 atomics, whose order varies between runs, so the two paths are compared
// on one sum: the finish pass is checked against bf16(scale · sum) of the sum it read (still in the
// workspace after attention_backward), and qk_norm_rope_backward reading that sum is checked against
// it reading bf16(scale · sum) uploaded as bf16. Bit equality needs no tolerance (ENGINEERING §4): both
// sides round the same fp32 product once, to nearest even.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "backend/cpu/rope.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/qk_norm_rope.h"
#include "core/error.h"
#include "cuda_test_util.h"
#include "op_test_util.h"

namespace pgolf::test {
namespace {

using bf16 = __nv_bfloat16;
using cuda::DeviceBuffer;
constexpr int kDh = cuda::kAttentionHeadDim;

// bf16 buffer contents as raw bits (NaN-safe equality).
std::vector<uint16_t> bits_of(const DeviceBuffer<bf16>& b) {
  const std::vector<bf16> v = b.download();
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<__nv_bfloat16_raw>(v[i]).x;
  return out;
}

std::vector<float> download_sum(const cuda::DqSum& s, size_t count) {
  std::vector<float> host(count);
  PG_CUDA_CHECK(cudaMemcpy(host.data(), s.sum, count * sizeof(float), cudaMemcpyDeviceToHost));
  return host;
}

// bf16(scale · sum) as the finish pass computes it (fp32 product, one round to nearest even).
std::vector<float> finished(const std::vector<float>& sum, float scale) {
  std::vector<float> out(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) out[i] = bf16_bits_to_f32(f32_to_bf16_bits(scale * sum[i]));
  return out;
}

// One layer's q/k preparation, attention and their backward on random inputs: qkv [N, ld] with
// ld = qd + 2·kvd (q, k, v column slices), positions token mod seq_len.
struct FoldCase {
  std::vector<int32_t> cu;
  int64_t seq_len;
  int heads = 8, kv_heads = 4, rope_dims = 16;
};

void check_fold(const std::string& name, const FoldCase& c, const cuda::AttentionTuning& tuning, float want_scale) {
  SCOPED_TRACE(name);
  const int64_t N = c.cu.back();
  const int H = c.heads, Hkv = c.kv_heads;
  const int64_t qd = int64_t{H} * kDh, kvd = int64_t{Hkv} * kDh, ld = qd + 2 * kvd;
  Rng rng(4100 + N);
  const auto d_qkv = to_device_bf16(random_bf16_values(N * ld, rng));
  const auto gain = DeviceBuffer<float>(params_near(H, rng, 1.5, 0.2));
  const cpu::RopeTable table = cpu::make_rope_table(10000.0, c.rope_dims, static_cast<int>(c.seq_len));
  DeviceBuffer<float> cos(table.cos), sin(table.sin);
  DeviceBuffer<int32_t> cu(c.cu);
  const cuda::QkShape qk{N, c.seq_len, H, Hkv, kDh, c.rope_dims};
  cuda::AttentionShape shape;
  shape.total_tokens = static_cast<int>(N), shape.num_heads = H, shape.num_kv_heads = Hkv;
  shape.cu_seqlens = cu.data(), shape.num_segments = static_cast<int>(c.cu.size()) - 1;

  DeviceBuffer<bf16> q(N * qd), k(N * kvd), o(N * qd), dk(N * kvd), dv(N * kvd), dq(N * qd);
  DeviceBuffer<float> q_rstd(N * H), k_rstd(N * Hkv), lse(N * H);
  const auto d_o = to_device_bf16(random_bf16_values(N * qd, rng));
  const bf16* v = d_qkv.data() + qd + kvd;  // strided value slice: copy it contiguous for attention
  DeviceBuffer<bf16> v_contig(N * kvd);
  PG_CUDA_CHECK(cudaMemcpy2D(v_contig.data(), kvd * sizeof(bf16), v, ld * sizeof(bf16), kvd * sizeof(bf16), N,
                             cudaMemcpyDeviceToDevice));
  cuda::qk_norm_rope_forward(d_qkv.data(), d_qkv.data() + qd, ld, gain.data(), cos.data(), sin.data(), q.data(),
                             k.data(), q_rstd.data(), k_rstd.data(), qk, nullptr);
  cuda::attention_forward(shape, q.data(), k.data(), v_contig.data(), o.data(), lse.data(), nullptr, tuning);
  const size_t ws_bytes = cuda::attention_backward_workspace_bytes(shape);
  auto ws = poisoned_buffer<unsigned char>(ws_bytes);
  TestWorkspace tw(cuda::qk_norm_rope_workspace_floats(qk));
  const size_t dq_count = static_cast<size_t>(N * qd);

  // The separate path, and its finish pass against the sum it read.
  cuda::attention_backward(shape, q.data(), k.data(), v_contig.data(), o.data(), lse.data(), d_o.data(), dq.data(),
                           dk.data(), dv.data(), ws.data(), ws_bytes, nullptr, tuning);
  sync_device();
  const std::vector<float> finish_sum = download_sum({reinterpret_cast<const float*>(ws.data()), 1.f}, dq_count);
  EXPECT_EQ(from_device_bf16(dq), finished(finish_sum, want_scale)) << "finish pass ≠ bf16(scale · sum)";

  // The unfinished backward: the same dk, dv, and its sum in the workspace with the finish's scale.
  auto dk_fold = poisoned_buffer<bf16>(N * kvd), dv_fold = poisoned_buffer<bf16>(N * kvd);
  const cuda::DqSum sum = cuda::attention_backward_unfinished(shape, q.data(), k.data(), v_contig.data(), o.data(),
                                                              lse.data(), d_o.data(), dk_fold.data(), dv_fold.data(),
                                                              ws.data(), ws_bytes, nullptr, tuning);
  EXPECT_EQ(static_cast<const void*>(sum.sum), static_cast<const void*>(ws.data()));
  EXPECT_EQ(sum.scale, want_scale);
  auto dqkv_fold = poisoned_buffer<bf16>(N * ld), dqkv_split = poisoned_buffer<bf16>(N * ld);
  DeviceBuffer<float> dgain_fold(std::vector<float>(H, 0.25f)), dgain_split(std::vector<float>(H, 0.25f));
  cuda::qk_norm_rope_backward(sum, dk_fold.data(), d_qkv.data(), d_qkv.data() + qd, ld, q_rstd.data(), k_rstd.data(),
                              gain.data(), cos.data(), sin.data(), dqkv_fold.data(), dqkv_fold.data() + qd, ld,
                              dgain_fold.data(), qk, tw.ws, nullptr);
  sync_device();
  EXPECT_EQ(bits_of(dk_fold), bits_of(dk)) << "dk of the unfinished backward";
  EXPECT_EQ(bits_of(dv_fold), bits_of(dv)) << "dv of the unfinished backward";

  // The same sum finished on the host, uploaded as bf16 dq and read by the separate path's qk backward.
  const auto dq_split = to_device_bf16(finished(download_sum(sum, dq_count), sum.scale));
  cuda::qk_norm_rope_backward(dq_split.data(), dk_fold.data(), d_qkv.data(), d_qkv.data() + qd, ld, q_rstd.data(),
                              k_rstd.data(), gain.data(), cos.data(), sin.data(), dqkv_split.data(),
                              dqkv_split.data() + qd, ld, dgain_split.data(), qk, tw.ws, nullptr);
  sync_device();
  const std::vector<uint16_t> fold_bits = bits_of(dqkv_fold), split_bits = bits_of(dqkv_split);
  // The v columns are written by neither (still poison in both); the q and k columns must match.
  size_t mismatches = 0, nonzero = 0;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < qd + kvd; ++j) {
      const size_t at = static_cast<size_t>(i * ld + j);
      mismatches += fold_bits[at] != split_bits[at];
      const bool finite = (split_bits[at] & 0x7F80) != 0x7F80;  // not the NaN poison, not Inf
      nonzero += finite && (split_bits[at] & 0x7FFF) != 0;
    }
  EXPECT_EQ(mismatches, 0u) << "dqkv (q, k columns) of the folded path ≠ finish + qk_norm_rope_backward";
  EXPECT_GT(nonzero, static_cast<size_t>(N * (qd + kvd) * 9 / 10)) << "q, k gradients mostly zero or unwritten: a vacuous comparison";
  EXPECT_EQ(dgain_fold.download(), dgain_split.download()) << "q-gain gradient";
}

cuda::AttentionTuning mma_sync_backward() {
  cuda::AttentionTuning t;
  t.backward_kernel = cuda::AttentionBackwardKernel::mma_sync;
  t.backward_warps = 8;
  return t;
}

constexpr float kWgmmaScale = 0.125f;  // 1/√64, left out of dS by the Hopper backwards (the default one)

class AttentionDqFoldTest : public CudaTest {};

TEST_F(AttentionDqFoldTest, DenseRowsAreBitIdentical) {
  const FoldCase dense{{0, 512, 1024, 1536}, 512};
  check_fold("dense_wgmma", dense, cuda::AttentionTuning{}, kWgmmaScale);
  check_fold("dense_mma_sync", dense, mma_sync_backward(), 1.f);
}

TEST_F(AttentionDqFoldTest, DocumentsAreBitIdentical) {
  // Document boundaries anywhere in rows of 1024 (positions restart with the row, not the document).
  const FoldCase docs{{0, 1, 130, 400, 401, 1024, 1100, 1700, 2048}, 1024, 4, 2, 64};
  check_fold("docs_wgmma", docs, cuda::AttentionTuning{}, kWgmmaScale);
  check_fold("docs_mma_sync", docs, mma_sync_backward(), 1.f);
}

TEST_F(AttentionDqFoldTest, DeterministicBackwardHasNoUnfinishedDq) {
  const std::vector<int32_t> host_cu{0, 64};
  DeviceBuffer<int32_t> cu(host_cu);
  cuda::AttentionShape shape;
  shape.total_tokens = 64, shape.num_heads = 8, shape.num_kv_heads = 4, shape.cu_seqlens = cu.data();
  shape.num_segments = 1;
  DeviceBuffer<bf16> x(64 * 8 * kDh);
  DeviceBuffer<float> lse(64 * 8);
  const size_t ws_bytes = cuda::attention_backward_workspace_bytes(shape);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  cuda::AttentionTuning det;
  det.deterministic = true;
  det.backward_warps = 4;
  EXPECT_THROW(cuda::attention_backward_unfinished(shape, x.data(), x.data(), x.data(), x.data(), lse.data(), x.data(),
                                                   x.data(), x.data(), ws.data(), ws_bytes, nullptr, det),
               Error);
}

}  // namespace
}  // namespace pgolf::test
