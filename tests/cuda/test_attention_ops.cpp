// The attention-side ops against their CPU twins, tolerance rule of op_test_util.h: QK-norm + RoPE +
// q gain (cpu rmsnorm / rope / head_scale), the value path (cpu scaled_add / value_mix), XSA, the
// attention gate, the reference attention for small head dims (cpu/attention.h) and the per-row LoRA
// products (cpu/lora.h). Head dims 8, 16 and 64, GQA groups of 1, 2 and 4, odd token counts, segments
// of length 0 and 1 anywhere.
#include <gtest/gtest.h>

#include <cstring>

#include "backend/cpu/attention.h"
#include "backend/cpu/gemm.h"
#include "backend/cpu/head_gate.h"
#include "backend/cpu/lora.h"
#include "backend/cpu/mixing.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/cpu/rope.h"
#include "backend/cpu/xsa.h"
#include "backend/cuda/attention_reference.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/head_gate.h"
#include "backend/cuda/lora.h"
#include "backend/cuda/qk_norm_rope.h"
#include "backend/cuda/value.h"
#include "backend/cuda/xsa.h"
#include "op_test_util.h"

namespace pgolf::test {
namespace {

using cuda::DeviceBuffer;
using bf16 = __nv_bfloat16;

class AttentionOpsTest : public CudaTest {};

// Columns [col, col + width) of the rows of a [rows, ld] matrix.
std::vector<float> columns(const std::vector<float>& m, int64_t rows, int64_t ld, int64_t col, int64_t width) {
  std::vector<float> out(rows * width);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) out[i * width + j] = m[i * ld + col + j];
  return out;
}

struct HeadCase {
  int64_t rows, seq_len;
  int heads, kv_heads, head_dim, rope_dims;
};

TEST_F(AttentionOpsTest, QkNormRopeGainMatchesTheCpuChain) {
  // Dh 24 with 12 rotary dims: 3 of a group's 8 lanes hold the vector and a RoPE partner sits in the
  // next lane at another register index (j + 6); Dh 16/8: partners in the same lane. 6 + 3 heads: 9
  // head vectors per token, so warps (4 vectors) straddle tokens and a block holds 36 vectors.
  for (const HeadCase c : {HeadCase{2, 37, 8, 4, 64, 16}, HeadCase{3, 29, 4, 2, 16, 8}, HeadCase{1, 41, 4, 2, 8, 8},
                           HeadCase{2, 31, 4, 2, 24, 12}, HeadCase{6, 2000, 8, 4, 64, 64},
                           HeadCase{3, 23, 6, 3, 32, 16}}) {
    const std::string tag = "N" + std::to_string(c.rows * c.seq_len) + "_Dh" + std::to_string(c.head_dim) + "_rd" +
                            std::to_string(c.rope_dims);
    SCOPED_TRACE(tag);
    const int64_t N = c.rows * c.seq_len;
    const int H = c.heads, Hkv = c.kv_heads, Dh = c.head_dim, qd = H * Dh, kvd = Hkv * Dh, ld = qd + 2 * kvd;
    Rng rng(800 + Dh + c.rows);
    const auto qkv = random_bf16_values(N * ld, rng, 2.0);
    const auto gain = params_near(H, rng, 1.5, 0.3);
    const cpu::RopeTable table = cpu::make_rope_table(22081.79, c.rope_dims, static_cast<int>(c.seq_len));
    std::vector<int32_t> pos(N);
    for (int64_t i = 0; i < N; ++i) pos[i] = static_cast<int32_t>(i % c.seq_len);
    const auto q_lin = columns(qkv, N, ld, 0, qd), k_lin = columns(qkv, N, ld, qd, kvd);

    auto forward = [&](auto zero) {
      using T = decltype(zero);
      std::vector<T> qr(N * qd), kr(N * kvd), q(N * qd), qs(N * H), ks(N * Hkv);
      const std::vector<T> ql(q_lin.begin(), q_lin.end()), kl(k_lin.begin(), k_lin.end()), g(gain.begin(), gain.end());
      cpu::rmsnorm_forward<T>(ql.data(), qr.data(), qs.data(), N * H, Dh);
      cpu::rope_forward<T>(qr.data(), pos.data(), table, N, H, Dh);
      cpu::rmsnorm_forward<T>(kl.data(), kr.data(), ks.data(), N * Hkv, Dh);
      cpu::rope_forward<T>(kr.data(), pos.data(), table, N, Hkv, Dh);
      cpu::head_scale_forward<T>(qr.data(), g.data(), q.data(), N, H, Dh);
      return std::make_tuple(q, kr, qs, ks, qr);
    };
    const auto [q_ref, k_ref, qs_ref, ks_ref, qr_ref] = forward(0.0);
    const auto [q_naive, k_naive, qs_naive, ks_naive, qr_naive] = forward(0.f);
    auto d_qkv = to_device_bf16(qkv);
    DeviceBuffer<float> d_gain(gain), d_cos(table.cos), d_sin(table.sin);
    auto q = poisoned_buffer<bf16>(N * qd), k = poisoned_buffer<bf16>(N * kvd);
    auto qs = poisoned_buffer<float>(N * H), ks = poisoned_buffer<float>(N * Hkv);
    const cuda::QkShape shape{N, c.seq_len, H, Hkv, Dh, c.rope_dims};
    cuda::qk_norm_rope_forward(d_qkv.data(), d_qkv.data() + qd, ld, d_gain.data(), d_cos.data(), d_sin.data(),
                               q.data(), k.data(), qs.data(), ks.data(), shape, nullptr);
    sync_device();
    expect_within_naive(tag + "_q", from_device_bf16(q), rounded_bf16(q_naive), q_ref, kBf16Bound);
    expect_within_naive(tag + "_k", from_device_bf16(k), rounded_bf16(k_naive), k_ref, kBf16Bound);
    expect_within_naive(tag + "_q_rstd", qs.download(), qs_naive, qs_ref, kF32Bound);
    expect_within_naive(tag + "_k_rstd", ks.download(), ks_naive, ks_ref, kF32Bound);

    // Backward from the shared fp32 rstd: q_rope is recomputed from q_lin·rstd on both sides.
    const auto dq = random_bf16_values(N * qd, rng), dk = random_bf16_values(N * kvd, rng);
    const auto dgain_init = random_f32_values(H, rng);
    auto backward = [&](auto zero) {
      using T = decltype(zero);
      const std::vector<T> ql(q_lin.begin(), q_lin.end()), kl(k_lin.begin(), k_lin.end()), g(gain.begin(), gain.end());
      const std::vector<T> qs_(qs_naive.begin(), qs_naive.end()), ks_(ks_naive.begin(), ks_naive.end());
      std::vector<T> qr(N * qd);
      for (int64_t r = 0; r < N * H; ++r)
        for (int j = 0; j < Dh; ++j) qr[r * Dh + j] = ql[r * Dh + j] * qs_[r];
      cpu::rope_forward<T>(qr.data(), pos.data(), table, N, H, Dh);
      std::vector<T> dqr(N * qd, T(0)), dql(N * qd, T(0)), dkr(dk.begin(), dk.end()), dkl(N * kvd, T(0));
      std::vector<T> dg(dgain_init.begin(), dgain_init.end());
      const std::vector<T> dqT(dq.begin(), dq.end());
      cpu::head_scale_backward<T>(dqT.data(), qr.data(), g.data(), dqr.data(), dg.data(), N, H, Dh);
      cpu::rope_backward<T>(dqr.data(), pos.data(), table, N, H, Dh);
      cpu::rmsnorm_backward<T>(dqr.data(), ql.data(), qs_.data(), dql.data(), N * H, Dh);
      cpu::rope_backward<T>(dkr.data(), pos.data(), table, N, Hkv, Dh);
      cpu::rmsnorm_backward<T>(dkr.data(), kl.data(), ks_.data(), dkl.data(), N * Hkv, Dh);
      return std::make_tuple(dql, dkl, dg);
    };
    const auto [dql_ref, dkl_ref, dg_ref] = backward(0.0);
    const auto [dql_naive, dkl_naive, dg_naive] = backward(0.f);
    auto d_dq = to_device_bf16(dq), d_dk = to_device_bf16(dk);
    DeviceBuffer<float> d_qs(qs_naive), d_ks(ks_naive), d_dg(dgain_init);
    auto dqkv = poisoned_buffer<bf16>(N * ld);
    TestWorkspace tw(cuda::qk_norm_rope_workspace_floats(shape));
    cuda::qk_norm_rope_backward(d_dq.data(), d_dk.data(), d_qkv.data(), d_qkv.data() + qd, ld, d_qs.data(),
                                d_ks.data(), d_gain.data(), d_cos.data(), d_sin.data(), dqkv.data(), dqkv.data() + qd,
                                ld, d_dg.data(), shape, tw.ws, nullptr);
    sync_device();
    const auto got = from_device_bf16(dqkv);
    expect_within_naive(tag + "_dq_lin", columns(got, N, ld, 0, qd), rounded_bf16(dql_naive), dql_ref, kBf16Bound);
    expect_within_naive(tag + "_dk_lin", columns(got, N, ld, qd, kvd), rounded_bf16(dkl_naive), dkl_ref, kBf16Bound);
    expect_within_naive(tag + "_dgain", d_dg.download(), dg_naive, dg_ref, kF32Bound);
  }
}

TEST_F(AttentionOpsTest, ValuePathMatchesScaledAddAndValueMix) {
  const int64_t N = 211;
  const int kvd = 48, ld = 144;
  struct Mode {
    bool ve, mix, v0, extra, dv0_add;
  };
  for (const Mode mode : {Mode{true, true, true, true, false}, Mode{false, true, false, false, true},
                          Mode{true, false, false, true, false}, Mode{false, false, false, false, true}}) {
    const std::string tag = std::string(mode.ve ? "ve" : "") + (mode.mix ? "_mix" : "") + (mode.v0 ? "_v0" : "") +
                            (mode.extra ? "_xsa" : "") + (mode.dv0_add ? "_first" : "");
    SCOPED_TRACE(tag);
    Rng rng(900 + mode.ve + 2 * mode.mix + 4 * mode.v0);
    const auto lin = random_bf16_values(N * ld, rng), ve = random_bf16_values(N * kvd, rng);
    const auto v0 = random_bf16_values(N * kvd, rng);
    const std::vector<float> lve{0.8f}, lvr{0.45f, 0.7f};
    const auto v_lin = columns(lin, N, ld, 64, kvd);
    auto forward = [&](auto zero) {
      using T = decltype(zero);
      std::vector<T> raw(v_lin.begin(), v_lin.end()), v(N * kvd);
      const std::vector<T> veT(ve.begin(), ve.end()), v0T(v0.begin(), v0.end()), l(lvr.begin(), lvr.end());
      if (mode.ve) cpu::scaled_add_forward<T>(veT.data(), T(lve[0]), raw.data(), N * kvd, true);
      if constexpr (std::is_same_v<T, float>) raw = rounded_bf16(raw);
      if (mode.mix) cpu::value_mix_forward<T>(raw.data(), mode.v0 ? v0T.data() : nullptr, l.data(), v.data(), N * kvd);
      return std::make_tuple(raw, v);
    };
    const auto [raw_ref, v_ref] = forward(0.0);
    const auto [raw_naive, v_naive] = forward(0.f);
    auto d_lin = to_device_bf16(lin), d_ve = to_device_bf16(ve), d_v0 = to_device_bf16(v0);
    DeviceBuffer<float> d_lve(lve), d_lvr(lvr);
    auto raw = poisoned_buffer<bf16>(N * kvd), v = poisoned_buffer<bf16>(N * kvd);
    const cuda::ValueShape shape{N, kvd};
    cuda::value_forward(d_lin.data() + 64, ld, mode.ve ? d_ve.data() : nullptr, mode.ve ? d_lve.data() : nullptr,
                        mode.v0 ? d_v0.data() : nullptr, mode.mix ? d_lvr.data() : nullptr, raw.data(), v.data(), shape,
                        nullptr);
    sync_device();
    if (mode.ve) expect_within_naive(tag + "_v_raw", from_device_bf16(raw), raw_naive, raw_ref, kBf16Bound);
    else EXPECT_EQ(from_device_bf16(raw), v_lin) << "without a value embedding v_raw is the projection's v columns";
    if (mode.mix) expect_within_naive(tag + "_v", from_device_bf16(v), rounded_bf16(v_naive), v_ref, kBf16Bound);

    const auto dv_attn = random_bf16_values(N * kvd, rng), dv_extra = random_f32_values(N * kvd, rng);
    const auto dv0_acc = random_f32_values(N * kvd, rng), dv0_add = random_f32_values(N * kvd, rng);
    const auto dve_init = random_f32_values(N * kvd, rng);
    const std::vector<float> dlvr_init{0.1f, -0.2f}, dlve_init{0.3f};
    auto backward = [&](auto zero) {
      using T = decltype(zero);
      std::vector<T> dv(N * kvd), raw_(raw_naive.begin(), raw_naive.end()), dv_raw(N * kvd, T(0));
      std::vector<T> acc(dv0_acc.begin(), dv0_acc.end()), dve(dve_init.begin(), dve_init.end());
      std::vector<T> dlvr(dlvr_init.begin(), dlvr_init.end()), dlve(dlve_init.begin(), dlve_init.end());
      const std::vector<T> v0T(v0.begin(), v0.end()), veT(ve.begin(), ve.end()), l(lvr.begin(), lvr.end());
      for (int64_t i = 0; i < N * kvd; ++i) dv[i] = T(dv_attn[i]) + (mode.extra ? T(dv_extra[i]) : T(0));
      if (mode.mix)
        cpu::value_mix_backward<T>(dv.data(), raw_.data(), mode.v0 ? v0T.data() : nullptr, l.data(), dv_raw.data(),
                                   mode.v0 ? acc.data() : nullptr, dlvr.data(), N * kvd);
      else
        dv_raw = dv;
      if (mode.dv0_add)
        for (int64_t i = 0; i < N * kvd; ++i) dv_raw[i] += T(dv0_add[i]);
      if (mode.ve) cpu::scaled_add_backward<T>(dv_raw.data(), veT.data(), T(lve[0]), dve.data(), dlve.data(), N * kvd);
      return std::make_tuple(dv_raw, acc, dve, dlvr, dlve);
    };
    const auto [dr_ref, acc_ref, dve_ref, dlvr_ref, dlve_ref] = backward(0.0);
    const auto [dr_naive, acc_naive, dve_naive, dlvr_naive, dlve_naive] = backward(0.f);
    auto d_dva = to_device_bf16(dv_attn), d_raw = to_device_bf16(raw_naive);
    DeviceBuffer<float> d_extra(dv_extra), d_acc(dv0_acc), d_add(dv0_add), d_dve(dve_init), d_dlvr(dlvr_init),
        d_dlve(dlve_init);
    auto dlin = poisoned_buffer<bf16>(N * ld);
    TestWorkspace tw(cuda::value_workspace_floats(shape));
    cuda::value_backward(d_dva.data(), mode.extra ? d_extra.data() : nullptr, d_raw.data(),
                         mode.v0 ? d_v0.data() : nullptr, mode.mix ? d_lvr.data() : nullptr,
                         mode.v0 ? d_acc.data() : nullptr, mode.dv0_add ? d_add.data() : nullptr,
                         mode.ve ? d_ve.data() : nullptr, mode.ve ? d_lve.data() : nullptr,
                         mode.ve ? d_dve.data() : nullptr, mode.mix ? d_dlvr.data() : nullptr,
                         mode.ve ? d_dlve.data() : nullptr, dlin.data() + 64, ld, shape, tw.ws, nullptr);
    sync_device();
    expect_within_naive(tag + "_dv_lin", columns(from_device_bf16(dlin), N, ld, 64, kvd), rounded_bf16(dr_naive),
                        dr_ref, kBf16Bound);
    if (mode.v0) expect_within_naive(tag + "_dv0", d_acc.download(), acc_naive, acc_ref, kF32Bound);
    if (mode.ve) {
      expect_within_naive(tag + "_dve", d_dve.download(), dve_naive, dve_ref, kF32Bound);
      expect_within_naive(tag + "_dve_lambda", d_dlve.download(), dlve_naive, dlve_ref, kF32Bound);
    }
    if (mode.mix) expect_within_naive(tag + "_dvr_lambda", d_dlvr.download(), dlvr_naive, dlvr_ref, kF32Bound);

    // ValueGradStart: fresh accumulators are written, not read (the bits of a pass on cleared ones), and a
    // null dve leaves dve_lambda's sum as it was.
    if (mode.v0 || mode.ve) {
      auto run = [&](float init, cuda::ValueGradStart start, bool with_dve) {
        const std::vector<float> fill(N * kvd, init);
        DeviceBuffer<float> acc(fill), dve(fill), dlvr(dlvr_init), dlve(dlve_init);
        auto out = poisoned_buffer<bf16>(N * ld);
        cuda::value_backward(d_dva.data(), mode.extra ? d_extra.data() : nullptr, d_raw.data(),
                             mode.v0 ? d_v0.data() : nullptr, mode.mix ? d_lvr.data() : nullptr,
                             mode.v0 ? acc.data() : nullptr, mode.dv0_add ? d_add.data() : nullptr,
                             mode.ve ? d_ve.data() : nullptr, mode.ve ? d_lve.data() : nullptr,
                             mode.ve && with_dve ? dve.data() : nullptr, mode.mix ? dlvr.data() : nullptr,
                             mode.ve ? dlve.data() : nullptr, out.data() + 64, ld, shape, tw.ws, nullptr, start);
        sync_device();
        return std::vector<std::vector<float>>{acc.download(), dve.download(), dlvr.download(), dlve.download(),
                                               from_device_bf16(out)};
      };
      const auto cleared = run(0.f, {}, true), fresh = run(NAN, {true, true}, true);
      const char* names[] = {"dv0", "dve", "dvr_lambda", "dve_lambda", "dv_lin"};
      for (int i = 0; i < 5; ++i) {
        if ((i == 0 && !mode.v0) || (i == 1 && !mode.ve)) continue;
        EXPECT_EQ(0, std::memcmp(cleared[i].data(), fresh[i].data(), cleared[i].size() * sizeof(float)))
            << tag << ": " << names[i] << " of fresh accumulators";
      }
      if (mode.ve) {
        const auto no_dve = run(0.f, {}, false);
        EXPECT_EQ(no_dve[3], cleared[3]) << tag << ": dve_lambda without dve";
        EXPECT_EQ(no_dve[1], std::vector<float>(N * kvd, 0.f)) << tag << ": a null dve is not written";
        EXPECT_EQ(0, std::memcmp(no_dve[4].data(), cleared[4].data(), cleared[4].size() * sizeof(float)))
            << tag << ": dv_lin without dve";
      }
    }
  }
}

TEST_F(AttentionOpsTest, XsaRemovesTheOwnValueComponent) {
  for (const HeadCase c : {HeadCase{1, 77, 8, 4, 64, 0}, HeadCase{1, 53, 4, 1, 16, 0}, HeadCase{1, 31, 4, 2, 8, 0}}) {
    const std::string tag = "Dh" + std::to_string(c.head_dim) + "_H" + std::to_string(c.heads) + "_kv" +
                            std::to_string(c.kv_heads);
    SCOPED_TRACE(tag);
    const int64_t N = c.seq_len;
    const int H = c.heads, Hkv = c.kv_heads, Dh = c.head_dim;
    Rng rng(1000 + Dh);
    const auto y = random_bf16_values(N * H * Dh, rng);
    auto v = random_bf16_values(N * Hkv * Dh, rng);
    for (int j = 0; j < Dh; ++j) v[5 * Hkv * Dh + j] = 0.f;  // a zero value vector: the clamped norm
    std::vector<double> out_ref(y.size());
    std::vector<float> out_naive(y.size());
    cpu::xsa_forward<double>(to_double(y).data(), to_double(v).data(), out_ref.data(), N, H, Hkv, Dh);
    cpu::xsa_forward<float>(y.data(), v.data(), out_naive.data(), N, H, Hkv, Dh);
    auto d_y = to_device_bf16(y), d_v = to_device_bf16(v);
    auto out = poisoned_buffer<bf16>(y.size());
    cuda::xsa_forward(d_y.data(), d_v.data(), out.data(), N, H, Hkv, Dh, nullptr);
    const auto dout = random_bf16_values(y.size(), rng);
    std::vector<double> dy_ref(y.size(), 0.0), dv_ref(v.size(), 0.0);
    std::vector<float> dy_naive(y.size(), 0.f), dv_naive(v.size(), 0.f);
    cpu::xsa_backward<double>(to_double(dout).data(), to_double(y).data(), to_double(v).data(), dy_ref.data(),
                              dv_ref.data(), N, H, Hkv, Dh);
    cpu::xsa_backward<float>(dout.data(), y.data(), v.data(), dy_naive.data(), dv_naive.data(), N, H, Hkv, Dh);
    auto d_dout = to_device_bf16(dout);
    auto dy = poisoned_buffer<bf16>(y.size());
    auto dv = poisoned_buffer<float>(v.size());
    cuda::xsa_backward(d_dout.data(), d_y.data(), d_v.data(), dy.data(), dv.data(), N, H, Hkv, Dh, nullptr);
    sync_device();
    expect_within_naive(tag + "_y", from_device_bf16(out), rounded_bf16(out_naive), out_ref, kBf16Bound);
    expect_within_naive(tag + "_dy", from_device_bf16(dy), rounded_bf16(dy_naive), dy_ref, kBf16Bound);
    expect_within_naive(tag + "_dv", dv.download(), dv_naive, dv_ref, kF32Bound);
  }
}

TEST_F(AttentionOpsTest, HeadGateWithPaddedLogitRows) {
  for (const HeadCase c : {HeadCase{1, 77, 8, 8, 64, 0}, HeadCase{1, 130, 4, 4, 16, 0}}) {
    const std::string tag = "H" + std::to_string(c.heads) + "_Dh" + std::to_string(c.head_dim);
    SCOPED_TRACE(tag);
    const int64_t N = c.seq_len;
    const int H = c.heads, Dh = c.head_dim, ld = 8;
    Rng rng(1100 + H);
    const auto y = random_bf16_values(N * H * Dh, rng), bias = params_near(H, rng, 4.0, 1.0);
    std::vector<float> logits_padded = random_f32_values(N * ld, rng, 2.0);
    const auto logits = columns(logits_padded, N, ld, 0, H);
    std::vector<double> gate_ref(N * H), out_ref(y.size());
    std::vector<float> gate_naive(N * H), out_naive(y.size());
    cpu::head_gate_forward<double>(to_double(y).data(), to_double(logits).data(), to_double(bias).data(),
                                   gate_ref.data(), out_ref.data(), N, H, Dh);
    cpu::head_gate_forward<float>(y.data(), logits.data(), bias.data(), gate_naive.data(), out_naive.data(), N, H, Dh);
    auto d_y = to_device_bf16(y);
    DeviceBuffer<float> d_logits(logits_padded), d_bias(bias);
    auto gate = poisoned_buffer<float>(N * H);
    auto out = poisoned_buffer<bf16>(y.size());
    const cuda::HeadGateShape shape{N, H, Dh, ld};
    cuda::head_gate_forward(d_y.data(), d_logits.data(), d_bias.data(), gate.data(), out.data(), shape, nullptr);
    sync_device();
    expect_within_naive(tag + "_gate", gate.download(), gate_naive, gate_ref, kF32Bound);
    expect_within_naive(tag + "_out", from_device_bf16(out), rounded_bf16(out_naive), out_ref, kBf16Bound);

    const auto dout = random_bf16_values(y.size(), rng), dbias_init = random_f32_values(H, rng);
    std::vector<double> dy_ref(y.size(), 0.0), dl_ref(N * H, 0.0), db_ref(dbias_init.begin(), dbias_init.end());
    std::vector<float> dy_naive(y.size(), 0.f), dl_naive(N * H, 0.f), db_naive = dbias_init;
    cpu::head_gate_backward<double>(to_double(dout).data(), to_double(y).data(), to_double(gate_naive).data(),
                                    dy_ref.data(), dl_ref.data(), db_ref.data(), N, H, Dh);
    cpu::head_gate_backward<float>(dout.data(), y.data(), gate_naive.data(), dy_naive.data(), dl_naive.data(),
                                   db_naive.data(), N, H, Dh);
    auto d_dout = to_device_bf16(dout);
    DeviceBuffer<float> d_gate(gate_naive), d_db(dbias_init);
    auto dy = poisoned_buffer<bf16>(y.size()), dl = poisoned_buffer<bf16>(N * ld);
    TestWorkspace tw(cuda::head_gate_workspace_floats(shape));
    cuda::head_gate_backward(d_dout.data(), d_y.data(), d_gate.data(), dy.data(), dl.data(), d_db.data(), shape, tw.ws,
                             nullptr);
    sync_device();
    const auto dl_got = from_device_bf16(dl);
    expect_within_naive(tag + "_dy", from_device_bf16(dy), rounded_bf16(dy_naive), dy_ref, kBf16Bound);
    expect_within_naive(tag + "_dlogits", columns(dl_got, N, ld, 0, H), rounded_bf16(dl_naive), dl_ref, kBf16Bound);
    expect_within_naive(tag + "_dbias", d_db.download(), db_naive, db_ref, kF32Bound);
    for (int64_t i = 0; i < N; ++i)
      for (int j = H; j < ld; ++j) ASSERT_EQ(dl_got[i * ld + j], 0.f) << "padding column " << j << " of row " << i;
  }
}

// The reference attention keeps every intermediate in fp32 and rounds only its outputs; the naive
// computation is the CPU twin in fp32 with the outputs rounded to bf16.
TEST_F(AttentionOpsTest, ReferenceAttentionSmallHeadDims) {
  const std::vector<int> lengths = {1, 130, 0, 7, 1, 64, 300, 2};
  std::vector<int32_t> cu{0};
  for (int len : lengths) cu.push_back(cu.back() + len);
  cu.push_back(cu.back());  // FlashAttention's padding with the total
  const int N = cu.back(), nseg = static_cast<int>(cu.size()) - 1;
  for (const HeadCase c : {HeadCase{1, 0, 4, 2, 8, 0}, HeadCase{1, 0, 4, 2, 16, 0}, HeadCase{1, 0, 8, 2, 64, 0}}) {
    const std::string tag = "Dh" + std::to_string(c.head_dim) + "_H" + std::to_string(c.heads);
    SCOPED_TRACE(tag);
    const int H = c.heads, Hkv = c.kv_heads, Dh = c.head_dim;
    Rng rng(1200 + Dh);
    const auto q = random_bf16_values(size_t(N) * H * Dh, rng, 1.5), k = random_bf16_values(size_t(N) * Hkv * Dh, rng);
    const auto v = random_bf16_values(size_t(N) * Hkv * Dh, rng), dout = random_bf16_values(q.size(), rng);
    const cpu::AttentionShape cs{N, H, Hkv, Dh};
    const double scale = 1.0 / std::sqrt(double(Dh));
    std::vector<double> o_ref(q.size()), lse_ref(size_t(N) * H);
    std::vector<float> o_naive(q.size()), lse_naive(size_t(N) * H);
    cpu::attention_forward<double>(to_double(q).data(), to_double(k).data(), to_double(v).data(), o_ref.data(),
                                   lse_ref.data(), cu.data(), nseg, cs, scale);
    cpu::attention_forward<float>(q.data(), k.data(), v.data(), o_naive.data(), lse_naive.data(), cu.data(), nseg, cs,
                                  static_cast<float>(scale));
    DeviceBuffer<int32_t> d_cu(cu);
    auto d_q = to_device_bf16(q), d_k = to_device_bf16(k), d_v = to_device_bf16(v), d_do = to_device_bf16(dout);
    auto o = poisoned_buffer<bf16>(q.size());
    auto lse = poisoned_buffer<float>(size_t(N) * H);
    cuda::AttentionShape shape;
    shape.total_tokens = N, shape.num_heads = H, shape.num_kv_heads = Hkv, shape.cu_seqlens = d_cu.data();
    shape.num_segments = nseg;
    cuda::attention_reference_forward(shape, Dh, 300, d_q.data(), d_k.data(), d_v.data(), o.data(), lse.data(),
                                      nullptr);
    sync_device();
    expect_within_naive(tag + "_o", from_device_bf16(o), rounded_bf16(o_naive), o_ref, kBf16Bound);
    // The device's LSE is [H, N], the CPU's [N, H].
    const auto lse_dev = lse.download();
    std::vector<float> lse_got(lse_dev.size());
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h) lse_got[size_t(i) * H + h] = lse_dev[size_t(h) * N + i];
    expect_within_naive(tag + "_lse", lse_got, lse_naive, lse_ref, kF32Bound);

    // Backward from the forward's rounded O and fp32 LSE, as the model runs it.
    const auto o_bf16 = rounded_bf16(o_naive);
    std::vector<double> dq_ref(q.size(), 0.0), dk_ref(k.size(), 0.0), dv_ref(v.size(), 0.0);
    std::vector<float> dq_naive(q.size(), 0.f), dk_naive(k.size(), 0.f), dv_naive(v.size(), 0.f);
    cpu::attention_backward<double>(to_double(dout).data(), to_double(q).data(), to_double(k).data(),
                                    to_double(v).data(), to_double(o_bf16).data(), to_double(lse_naive).data(),
                                    dq_ref.data(), dk_ref.data(), dv_ref.data(), cu.data(), nseg, cs, scale);
    cpu::attention_backward<float>(dout.data(), q.data(), k.data(), v.data(), o_bf16.data(), lse_naive.data(),
                                   dq_naive.data(), dk_naive.data(), dv_naive.data(), cu.data(), nseg, cs,
                                   static_cast<float>(scale));
    std::vector<float> lse_hn(lse_naive.size());
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h) lse_hn[size_t(h) * N + i] = lse_naive[size_t(i) * H + h];
    auto d_o = to_device_bf16(o_bf16);
    DeviceBuffer<float> d_lse(lse_hn);
    auto dq = poisoned_buffer<bf16>(q.size()), dk = poisoned_buffer<bf16>(k.size()), dv = poisoned_buffer<bf16>(v.size());
    const size_t ws_bytes = cuda::attention_reference_workspace_bytes(shape, Dh);
    auto ws = poisoned_buffer<unsigned char>(ws_bytes);
    cuda::attention_reference_backward(shape, Dh, 300, d_q.data(), d_k.data(), d_v.data(), d_o.data(), d_lse.data(),
                                       d_do.data(), dq.data(), dk.data(), dv.data(), ws.data(), ws_bytes, nullptr);
    sync_device();
    expect_within_naive(tag + "_dq", from_device_bf16(dq), rounded_bf16(dq_naive), dq_ref, kBf16Bound);
    expect_within_naive(tag + "_dk", from_device_bf16(dk), rounded_bf16(dk_naive), dk_ref, kBf16Bound);
    expect_within_naive(tag + "_dv", from_device_bf16(dv), rounded_bf16(dv_naive), dv_ref, kBf16Bound);
  }
}

// Per-row adapters on a column slice of a wider output (the q columns of the fused projection).
TEST_F(AttentionOpsTest, LoraProductsPerRowOnStridedOutputs) {
  const int rows = 3, T = 37, in = 64, out = 48, r = 8, y_ld = 96, y_col = 16;
  const int64_t N = int64_t{rows} * T;
  Rng rng(1300);
  const auto x = random_bf16_values(N * in, rng), A = random_bf16_values(rows * r * in, rng, 0.3);
  const auto B = random_bf16_values(rows * out * r, rng, 0.3), y0 = random_bf16_values(N * y_ld, rng);
  const cpu::LoraShape cs{rows, T, in, out, r};
  const auto y0_slice = columns(y0, N, y_ld, y_col, out);
  // Forward: h = x Aᵀ (stored bf16), y += h Bᵀ.
  std::vector<double> h_ref(N * r), y_ref(y0_slice.begin(), y0_slice.end());
  cpu::lora_forward<double>(to_double(x).data(), to_double(A).data(), to_double(B).data(), h_ref.data(), y_ref.data(),
                            cs);
  std::vector<float> h_naive(N * r), y_naive = y0_slice, unused(N * out, 0.f);
  cpu::lora_forward<float>(x.data(), A.data(), B.data(), h_naive.data(), unused.data(), cs);
  h_naive = rounded_bf16(h_naive);
  for (int b = 0; b < rows; ++b)
    cpu::gemm<float>(false, true, T, out, r, 1.f, h_naive.data() + b * T * r, r, B.data() + b * out * r, r, 1.f,
                     y_naive.data() + b * T * out, out);
  auto d_x = to_device_bf16(x), d_A = to_device_bf16(A), d_B = to_device_bf16(B), d_y = to_device_bf16(y0);
  auto h = poisoned_buffer<bf16>(N * r);
  cuda::GemmRunner gemm;
  const cuda::LoraGemmShape shape{rows, T, in, out, r, in, y_ld};
  cuda::lora_forward(gemm, d_x.data(), d_A.data(), d_B.data(), h.data(), d_y.data() + y_col, shape, nullptr);
  sync_device();
  const auto y_got = from_device_bf16(d_y);
  expect_within_naive("lora_h", from_device_bf16(h), h_naive, h_ref, kBf16Bound);
  expect_within_naive("lora_y", columns(y_got, N, y_ld, y_col, out), rounded_bf16(y_naive), y_ref, kBf16Bound);
  for (int64_t i = 0; i < N; ++i) {
    for (int j = 0; j < y_ld; ++j) {
      if (j < y_col || j >= y_col + out) {
        ASSERT_EQ(y_got[i * y_ld + j], y0[i * y_ld + j]) << "outside the slice";
      }
    }
  }

  // Backward from a strided dy and the stored h: dB += dyᵀh, dh = dy B (bf16), dA += dhᵀx, dx += dh A.
  const auto dy_full = random_bf16_values(N * y_ld, rng), dx0 = random_f32_values(N * in, rng);
  const auto dA0 = random_f32_values(A.size(), rng), dB0 = random_f32_values(B.size(), rng);
  const auto dy = columns(dy_full, N, y_ld, y_col, out);
  std::vector<double> dx_ref(dx0.begin(), dx0.end()), dA_ref(dA0.begin(), dA0.end()), dB_ref(dB0.begin(), dB0.end());
  cpu::lora_backward<double>(to_double(dy).data(), to_double(x).data(), to_double(A).data(), to_double(B).data(),
                             to_double(h_naive).data(), dx_ref.data(), dA_ref.data(), dB_ref.data(), cs);
  std::vector<float> dx_naive = dx0, dA_naive = dA0, dB_naive = dB0, dh(N * r);
  for (int b = 0; b < rows; ++b) {
    const float* dyb = dy.data() + b * T * out;
    cpu::gemm<float>(true, false, out, r, T, 1.f, dyb, out, h_naive.data() + b * T * r, r, 1.f,
                     dB_naive.data() + b * out * r, r);
    cpu::gemm<float>(false, false, T, r, out, 1.f, dyb, out, B.data() + b * out * r, r, 0.f, dh.data() + b * T * r, r);
  }
  dh = rounded_bf16(dh);
  for (int b = 0; b < rows; ++b) {
    cpu::gemm<float>(true, false, r, in, T, 1.f, dh.data() + b * T * r, r, x.data() + b * T * in, in, 1.f,
                     dA_naive.data() + b * r * in, in);
    cpu::gemm<float>(false, false, T, in, r, 1.f, dh.data() + b * T * r, r, A.data() + b * r * in, in, 1.f,
                     dx_naive.data() + b * T * in, in);
  }
  auto d_dy = to_device_bf16(dy_full), d_h = to_device_bf16(h_naive);
  auto d_dh = poisoned_buffer<bf16>(N * r);
  DeviceBuffer<float> d_dx(dx0), d_dA(dA0), d_dB(dB0);
  // As GpuModel runs it with the side stream: the dh and dx products without the weight gradients,
  // which lora_grad_b and lora_grad_a form apart.
  cuda::lora_backward_out(gemm, d_dy.data() + y_col, d_B.data(), d_h.data(), d_dh.data(), nullptr, shape, nullptr);
  cuda::lora_grad_b(gemm, d_dy.data() + y_col, d_h.data(), d_dB.data(), shape, nullptr);
  cuda::lora_backward_in(gemm, d_dh.data(), d_x.data(), d_A.data(), nullptr, d_dx.data(), shape, nullptr);
  cuda::lora_grad_a(gemm, d_dh.data(), d_x.data(), d_dA.data(), shape, nullptr);
  sync_device();
  expect_within_naive("lora_dB", d_dB.download(), dB_naive, dB_ref, kF32Bound);
  expect_within_naive("lora_dA", d_dA.download(), dA_naive, dA_ref, kF32Bound);
  expect_within_naive("lora_dx", d_dx.download(), dx_naive, dx_ref, kF32Bound);
}

// A group of adapters reading the same x (q, k, v of a layer): their A side by side per row, one product
// for all their h (rank g·r), each member's y from its column slice of h, and in the backward each
// member's dB and d h slice, then one product each for the group's dA and dx.
TEST_F(AttentionOpsTest, LoraGroupProductsEqualTheMembersProducts) {
  const int rows = 3, T = 41, in = 64, r = 8, y_ld = 96;
  const std::vector<int> outs = {48, 24, 24}, cols = {0, 48, 72};
  const int g = static_cast<int>(outs.size());
  const int64_t N = int64_t{rows} * T, stride = int64_t{g} * r * in;
  Rng rng(1310);
  const auto x = random_bf16_values(N * in, rng), A = random_bf16_values(rows * stride, rng, 0.3);
  std::vector<std::vector<float>> B;
  for (int o : outs) B.push_back(random_bf16_values(int64_t{rows} * o * r, rng, 0.3));
  const auto y0 = random_bf16_values(N * y_ld, rng), dy_full = random_bf16_values(N * y_ld, rng);
  const auto dx0 = random_f32_values(N * in, rng), dA0 = random_f32_values(A.size(), rng);
  const auto xd = to_double(x), Ad = to_double(A);

  auto d_x = to_device_bf16(x), d_A = to_device_bf16(A), d_y = to_device_bf16(y0), d_dy = to_device_bf16(dy_full);
  std::vector<DeviceBuffer<bf16>> d_B;
  for (const auto& b : B) d_B.push_back(to_device_bf16(b));
  auto h = poisoned_buffer<bf16>(N * g * r), dh = poisoned_buffer<bf16>(N * g * r);
  DeviceBuffer<float> d_dx(dx0), d_dA(dA0);
  std::vector<DeviceBuffer<float>> d_dB;
  std::vector<std::vector<float>> dB0;
  for (int o : outs) {
    dB0.push_back(random_f32_values(int64_t{rows} * o * r, rng));
    d_dB.emplace_back(dB0.back());
  }
  cuda::GemmRunner gemm;
  cuda::LoraGemmShape group{rows, T, in, in, g * r, in, 0};
  auto member = [&](int i) {
    cuda::LoraGemmShape s{rows, T, in, outs[static_cast<size_t>(i)], r, in, y_ld};
    s.a_stride = stride, s.h_ld = int64_t{g} * r;
    return s;
  };
  cuda::lora_hidden(gemm, d_x.data(), d_A.data(), h.data(), group, nullptr);
  for (int i = 0; i < g; ++i)
    cuda::lora_apply(gemm, h.data() + i * r, d_B[static_cast<size_t>(i)].data(), d_y.data() + cols[static_cast<size_t>(i)],
                     member(i), nullptr);
  for (int i = 0; i < g; ++i)
    cuda::lora_backward_out(gemm, d_dy.data() + cols[static_cast<size_t>(i)], d_B[static_cast<size_t>(i)].data(),
                            h.data() + i * r, dh.data() + i * r, d_dB[static_cast<size_t>(i)].data(), member(i), nullptr);
  cuda::lora_backward_in(gemm, dh.data(), d_x.data(), d_A.data(), d_dA.data(), d_dx.data(), group, nullptr);
  sync_device();
  const auto h_got = from_device_bf16(h), y_got = from_device_bf16(d_y);

  // References member by member (cpu::lora_* with the group's row stride of A), in double and in float.
  std::vector<double> dx_ref(dx0.begin(), dx0.end()), dA_ref(dA0.begin(), dA0.end());
  std::vector<float> dx_naive = dx0, dA_naive = dA0;
  for (int i = 0; i < g; ++i) {
    const int out = outs[static_cast<size_t>(i)], col = cols[static_cast<size_t>(i)];
    const cpu::LoraShape cs{rows, T, in, out, r, stride};
    const auto y0_slice = columns(y0, N, y_ld, col, out), dy = columns(dy_full, N, y_ld, col, out);
    std::vector<double> h_ref(N * r), y_ref(y0_slice.begin(), y0_slice.end());
    cpu::lora_forward<double>(xd.data(), Ad.data() + i * r * in, to_double(B[static_cast<size_t>(i)]).data(),
                              h_ref.data(), y_ref.data(), cs);
    std::vector<float> h_naive(N * r), unused(N * out, 0.f), y_naive = y0_slice;
    cpu::lora_forward<float>(x.data(), A.data() + i * r * in, B[static_cast<size_t>(i)].data(), h_naive.data(),
                             unused.data(), cs);
    h_naive = rounded_bf16(h_naive);
    for (int b = 0; b < rows; ++b)
      cpu::gemm<float>(false, true, T, out, r, 1.f, h_naive.data() + b * T * r, r,
                       B[static_cast<size_t>(i)].data() + b * out * r, r, 1.f, y_naive.data() + b * T * out, out);
    const std::string tag = "lora_group" + std::to_string(i);
    expect_within_naive(tag + "_h", columns(h_got, N, g * r, i * r, r), h_naive, h_ref, kBf16Bound);
    expect_within_naive(tag + "_y", columns(y_got, N, y_ld, col, out), rounded_bf16(y_naive), y_ref, kBf16Bound);

    // Backward from the device's h (bf16): the member's dB exactly as alone, its share of dA and dx.
    const auto h_used = columns(h_got, N, g * r, i * r, r);
    std::vector<double> dB_ref(dB0[static_cast<size_t>(i)].begin(), dB0[static_cast<size_t>(i)].end());
    cpu::lora_backward<double>(to_double(dy).data(), xd.data(), Ad.data() + i * r * in,
                               to_double(B[static_cast<size_t>(i)]).data(), to_double(h_used).data(), dx_ref.data(),
                               dA_ref.data() + i * r * in, dB_ref.data(), cs);
    std::vector<float> dB_naive = dB0[static_cast<size_t>(i)], dh_naive(N * r);
    for (int b = 0; b < rows; ++b) {
      const float* dyb = dy.data() + b * T * out;
      cpu::gemm<float>(true, false, out, r, T, 1.f, dyb, out, h_used.data() + b * T * r, r, 1.f,
                       dB_naive.data() + b * out * r, r);
      cpu::gemm<float>(false, false, T, r, out, 1.f, dyb, out, B[static_cast<size_t>(i)].data() + b * out * r, r, 0.f,
                       dh_naive.data() + b * T * r, r);
    }
    dh_naive = rounded_bf16(dh_naive);
    for (int b = 0; b < rows; ++b) {
      cpu::gemm<float>(true, false, r, in, T, 1.f, dh_naive.data() + b * T * r, r, x.data() + b * T * in, in, 1.f,
                       dA_naive.data() + b * stride + i * r * in, in);
      cpu::gemm<float>(false, false, T, in, r, 1.f, dh_naive.data() + b * T * r, r, A.data() + b * stride + i * r * in,
                       in, 1.f, dx_naive.data() + b * T * in, in);
    }
    expect_within_naive(tag + "_dB", d_dB[static_cast<size_t>(i)].download(), dB_naive, dB_ref, kF32Bound);
  }
  expect_within_naive("lora_group_dA", d_dA.download(), dA_naive, dA_ref, kF32Bound);
  expect_within_naive("lora_group_dx", d_dx.download(), dx_naive, dx_ref, kF32Bound);
}

}  // namespace
}  // namespace pgolf::test
