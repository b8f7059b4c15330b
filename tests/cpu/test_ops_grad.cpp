// Every CPU op's backward against central finite differences in fp64 (see fd_check.h for the
// tolerance). Each test builds L = Σ w ⊙ op(inputs) with random weights w, runs the op's backward
// with dout = w and compares every input and parameter gradient.
#include <gtest/gtest.h>

#include "backend/cpu/activation.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/embedding.h"
#include "backend/cpu/head_gate.h"
#include "backend/cpu/linear.h"
#include "backend/cpu/lora.h"
#include "backend/cpu/mixing.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/cpu/rope.h"
#include "backend/cpu/smear.h"
#include "backend/cpu/softcap_ce.h"
#include "backend/cpu/xsa.h"
#include "fd_check.h"

using namespace pgolf;
using namespace pgolf::cpu;
using pgolf::test::expect_gradient_matches;
using pgolf::test::random_vector;
using pgolf::test::weighted_sum;
using Vec = std::vector<double>;

TEST(OpGrad, Linear) {
  Rng rng(1);
  const int64_t N = 5, in = 7, out = 4;
  Vec x = random_vector(rng, N * in), W = random_vector(rng, out * in), w = random_vector(rng, N * out);
  auto loss = [&] {
    Vec y(N * out);
    linear_forward(x.data(), W.data(), y.data(), N, in, out);
    return weighted_sum(w, y);
  };
  Vec dx(x.size()), dW(W.size());
  linear_backward(w.data(), x.data(), W.data(), dx.data(), dW.data(), N, in, out);
  expect_gradient_matches("dx", x, dx, loss);
  expect_gradient_matches("dW", W, dW, loss);
}

TEST(OpGrad, EmbeddingScatterAddsRepeatedIds) {
  Rng rng(2);
  const int64_t rows = 6, dim = 3;
  const std::vector<int32_t> ids = {1, 4, 1, 0, 5, 1};
  Vec table = random_vector(rng, rows * dim), w = random_vector(rng, ids.size() * dim);
  auto loss = [&] {
    Vec out(ids.size() * dim);
    embedding_forward(ids.data(), static_cast<int64_t>(ids.size()), table.data(), rows, dim, out.data());
    return weighted_sum(w, out);
  };
  Vec dtable(table.size());
  embedding_backward(ids.data(), static_cast<int64_t>(ids.size()), w.data(), dim, dtable.data());
  expect_gradient_matches("dtable", table, dtable, loss);
}

TEST(OpGrad, RmsNormWithScale) {
  Rng rng(3);
  const int64_t rows = 4, dim = 9;
  const double scale = 1.0 / std::sqrt(3.0);
  Vec x = random_vector(rng, rows * dim), w = random_vector(rng, rows * dim);
  auto loss = [&] {
    Vec y(x.size()), r(rows);
    rmsnorm_forward(x.data(), y.data(), r.data(), rows, dim, scale);
    return weighted_sum(w, y);
  };
  Vec y(x.size()), r(rows), dx(x.size());
  rmsnorm_forward(x.data(), y.data(), r.data(), rows, dim, scale);
  rmsnorm_backward(w.data(), x.data(), r.data(), dx.data(), rows, dim, scale);
  expect_gradient_matches("dx", x, dx, loss);
}

TEST(OpGrad, RopePartial) {
  Rng rng(4);
  const int64_t N = 5;
  const int heads = 3, Dh = 8;
  const RopeTable table = make_rope_table(10000.0, 4, 16);
  const std::vector<int32_t> pos = {0, 3, 7, 15, 2};
  Vec x = random_vector(rng, N * heads * Dh), w = random_vector(rng, x.size());
  auto loss = [&] {
    Vec y = x;
    rope_forward(y.data(), pos.data(), table, N, heads, Dh);
    return weighted_sum(w, y);
  };
  Vec dx = w;
  rope_backward(dx.data(), pos.data(), table, N, heads, Dh);
  expect_gradient_matches("dx", x, dx, loss);
}

TEST(OpGrad, AttentionGqaSegments) {
  Rng rng(5);
  const AttentionShape s{9, 4, 2, 3};
  // Three segments (one cut mid-way, one empty, as in padded cu_seqlens).
  const std::vector<int32_t> cu = {0, 4, 4, 9};
  const int64_t nseg = 3;
  Vec q = random_vector(rng, 9 * 4 * 3), k = random_vector(rng, 9 * 2 * 3), v = random_vector(rng, 9 * 2 * 3);
  Vec w = random_vector(rng, q.size());
  const double scale = 1.0 / std::sqrt(3.0);
  auto forward = [&](Vec& y, Vec& lse) {
    attention_forward(q.data(), k.data(), v.data(), y.data(), lse.data(), cu.data(), nseg, s, scale);
  };
  auto loss = [&] {
    Vec y(q.size()), lse(9 * 4);
    forward(y, lse);
    return weighted_sum(w, y);
  };
  Vec y(q.size()), lse(9 * 4), dq(q.size()), dk(k.size()), dv(v.size());
  forward(y, lse);
  attention_backward(w.data(), q.data(), k.data(), v.data(), y.data(), lse.data(), dq.data(), dk.data(), dv.data(),
                     cu.data(), nseg, s, scale);
  expect_gradient_matches("dq", q, dq, loss);
  expect_gradient_matches("dk", k, dk, loss);
  expect_gradient_matches("dv", v, dv, loss);
}

TEST(OpGrad, Xsa) {
  Rng rng(6);
  const int64_t N = 4;
  const int H = 4, Hkv = 2, Dh = 5;
  Vec y = random_vector(rng, N * H * Dh), v = random_vector(rng, N * Hkv * Dh), w = random_vector(rng, y.size());
  auto loss = [&] {
    Vec out(y.size());
    xsa_forward(y.data(), v.data(), out.data(), N, H, Hkv, Dh);
    return weighted_sum(w, out);
  };
  Vec dy(y.size()), dv(v.size());
  xsa_backward(w.data(), y.data(), v.data(), dy.data(), dv.data(), N, H, Hkv, Dh);
  expect_gradient_matches("dy", y, dy, loss);
  expect_gradient_matches("dv", v, dv, loss);
}

TEST(OpGrad, HeadGateWithBias) {
  Rng rng(7);
  const int64_t N = 3;
  const int H = 2, Dh = 4;
  Vec y = random_vector(rng, N * H * Dh), logits = random_vector(rng, N * H), bias = random_vector(rng, H);
  Vec w = random_vector(rng, y.size());
  auto loss = [&] {
    Vec out(y.size()), gate(logits.size());
    head_gate_forward(y.data(), logits.data(), bias.data(), gate.data(), out.data(), N, H, Dh);
    return weighted_sum(w, out);
  };
  Vec out(y.size()), gate(logits.size()), dy(y.size()), dl(logits.size()), db(H);
  head_gate_forward(y.data(), logits.data(), bias.data(), gate.data(), out.data(), N, H, Dh);
  head_gate_backward(w.data(), y.data(), gate.data(), dy.data(), dl.data(), db.data(), N, H, Dh);
  expect_gradient_matches("dy", y, dy, loss);
  expect_gradient_matches("dlogits", logits, dl, loss);
  expect_gradient_matches("dbias", bias, db, loss);
}

TEST(OpGrad, HeadScale) {
  Rng rng(18);
  const int64_t N = 3;
  const int H = 4, Dh = 2;
  Vec x = random_vector(rng, N * H * Dh), gain = random_vector(rng, H), w = random_vector(rng, x.size());
  auto loss = [&] {
    Vec out(x.size());
    head_scale_forward(x.data(), gain.data(), out.data(), N, H, Dh);
    return weighted_sum(w, out);
  };
  Vec dx(x.size()), dgain(H);
  head_scale_backward(w.data(), x.data(), gain.data(), dx.data(), dgain.data(), N, H, Dh);
  expect_gradient_matches("dx", x, dx, loss);
  expect_gradient_matches("dgain", gain, dgain, loss);
}

TEST(OpGrad, LeakyReluSquare) {
  for (double slope : {0.0, 0.5}) {
    Rng rng(8);
    Vec pre = random_vector(rng, 40), w = random_vector(rng, 40);
    for (auto& p : pre)
      if (std::fabs(p) < 1e-3) p = 0.5;  // keep finite differences off the kink at 0
    auto loss = [&] {
      Vec post(pre.size());
      leaky_relu_sq_forward(pre.data(), post.data(), 40, slope);
      return weighted_sum(w, post);
    };
    Vec dpre(pre.size());
    leaky_relu_sq_backward(w.data(), pre.data(), dpre.data(), 40, slope);
    expect_gradient_matches("dpre slope " + std::to_string(slope), pre, dpre, loss);
  }
}

TEST(OpGrad, SoftcapCrossEntropy) {
  Rng rng(9);
  const int64_t N = 4, V = 11;
  const double cap = 3.0;  // small cap: tanh well inside its nonlinear range
  Vec z = random_vector(rng, N * V, 4.0), dloss = random_vector(rng, N);
  const std::vector<int32_t> targets = {3, 0, 10, 3};
  auto loss = [&] {
    Vec capped(z.size()), losses(N), lse(N);
    softcap_ce_forward(z.data(), capped.data(), targets.data(), losses.data(), lse.data(), N, V, cap);
    return weighted_sum(dloss, losses);
  };
  Vec capped(z.size()), losses(N), lse(N), dz(z.size());
  softcap_ce_forward(z.data(), capped.data(), targets.data(), losses.data(), lse.data(), N, V, cap);
  softcap_ce_backward(capped.data(), lse.data(), targets.data(), dloss.data(), dz.data(), N, V, cap);
  expect_gradient_matches("dz", z, dz, loss);
}

TEST(OpGrad, SmearGate) {
  Rng rng(10);
  const int64_t rows = 2, T = 4, d = 3;
  Vec x = random_vector(rng, rows * T * d), gate = random_vector(rng, d), w = random_vector(rng, x.size());
  auto loss = [&] {
    Vec y(x.size());
    smear_forward(x.data(), gate.data(), y.data(), rows, T, d);
    return weighted_sum(w, y);
  };
  Vec dx(x.size()), dgate(d);
  smear_backward(w.data(), x.data(), gate.data(), dx.data(), dgate.data(), rows, T, d);
  expect_gradient_matches("dx", x, dx, loss);
  expect_gradient_matches("dgate", gate, dgate, loss);
}

TEST(OpGrad, ResidMix) {
  Rng rng(11);
  const int64_t N = 3, d = 4;
  Vec x = random_vector(rng, N * d), x0 = random_vector(rng, N * d), mix = random_vector(rng, 2 * d);
  Vec w = random_vector(rng, N * d);
  auto loss = [&] {
    Vec out(N * d);
    resid_mix_forward(x.data(), x0.data(), mix.data(), out.data(), N, d);
    return weighted_sum(w, out);
  };
  Vec dx(x.size()), dx0(x.size()), dmix(mix.size());
  resid_mix_backward(w.data(), x.data(), x0.data(), mix.data(), dx.data(), dx0.data(), dmix.data(), N, d);
  expect_gradient_matches("dx", x, dx, loss);
  expect_gradient_matches("dx0", x0, dx0, loss);
  expect_gradient_matches("dmix", mix, dmix, loss);
}

TEST(OpGrad, BranchAddWithAndWithoutGate) {
  for (bool gated : {false, true}) {
    Rng rng(12);
    const int64_t N = 3, d = 4;
    Vec x = random_vector(rng, N * d), a = random_vector(rng, N * d), scale = random_vector(rng, d);
    Vec gate = random_vector(rng, d), w = random_vector(rng, N * d);
    const double* g = gated ? gate.data() : nullptr;
    auto loss = [&] {
      Vec out(N * d);
      branch_add_forward(x.data(), a.data(), scale.data(), g, out.data(), N, d);
      return weighted_sum(w, out);
    };
    Vec da(a.size()), dscale(d), dgate(d);
    branch_add_backward(w.data(), a.data(), scale.data(), g, da.data(), dscale.data(), dgate.data(), N, d);
    Vec dx = w;  // the identity path: the caller's running gradient
    const std::string tag = gated ? " (gated)" : "";
    expect_gradient_matches("dx" + tag, x, dx, loss);
    expect_gradient_matches("da" + tag, a, da, loss);
    expect_gradient_matches("dscale" + tag, scale, dscale, loss);
    if (gated) expect_gradient_matches("dgate", gate, dgate, loss);
  }
}

TEST(OpGrad, SkipAddWithAndWithoutGate) {
  for (bool gated : {false, true}) {
    Rng rng(13);
    const int64_t N = 3, d = 4;
    Vec x = random_vector(rng, N * d), s = random_vector(rng, N * d), wt = random_vector(rng, d);
    Vec gate = random_vector(rng, d), w = random_vector(rng, N * d);
    const double* g = gated ? gate.data() : nullptr;
    auto loss = [&] {
      Vec out(N * d);
      skip_add_forward(x.data(), s.data(), wt.data(), g, out.data(), N, d);
      return weighted_sum(w, out);
    };
    Vec dx(x.size()), ds(s.size()), dwt(d), dgate(d);
    skip_add_backward(w.data(), x.data(), s.data(), wt.data(), g, dx.data(), ds.data(), dwt.data(), dgate.data(), N, d);
    const std::string tag = gated ? " (gated)" : "";
    expect_gradient_matches("dx" + tag, x, dx, loss);
    expect_gradient_matches("ds" + tag, s, ds, loss);
    expect_gradient_matches("dw" + tag, wt, dwt, loss);
    if (gated) expect_gradient_matches("dgate", gate, dgate, loss);
  }
}

TEST(OpGrad, LaneUpdate) {
  Rng rng(14);
  const int64_t N = 2, d = 3;
  Vec l0 = random_vector(rng, N * d), l1 = random_vector(rng, N * d), a = random_vector(rng, N * d);
  Vec m = random_vector(rng, N * d), resid = random_vector(rng, 2), post = random_vector(rng, 4);
  Vec w0 = random_vector(rng, N * d), w1 = random_vector(rng, N * d);
  auto loss = [&] {
    Vec o0(N * d), o1(N * d);
    lane_update_forward(l0.data(), l1.data(), a.data(), m.data(), resid.data(), post.data(), o0.data(), o1.data(), N,
                        d);
    return weighted_sum(w0, o0) + weighted_sum(w1, o1);
  };
  Vec dl0(N * d), dl1(N * d), da(N * d), dm(N * d), dresid(2), dpost(4);
  lane_update_backward(w0.data(), w1.data(), l0.data(), l1.data(), a.data(), m.data(), resid.data(), post.data(),
                       dl0.data(), dl1.data(), da.data(), dm.data(), dresid.data(), dpost.data(), N, d);
  expect_gradient_matches("dlane0", l0, dl0, loss);
  expect_gradient_matches("dlane1", l1, dl1, loss);
  expect_gradient_matches("da", a, da, loss);
  expect_gradient_matches("dm", m, dm, loss);
  expect_gradient_matches("dresid", resid, dresid, loss);
  expect_gradient_matches("dpost", post, dpost, loss);
}

TEST(OpGrad, ValueMixBothForms) {
  for (bool first : {true, false}) {
    Rng rng(15);
    const int64_t n = 7;
    Vec v = random_vector(rng, n), v0 = random_vector(rng, n), lambda = random_vector(rng, 2), w = random_vector(rng, n);
    const double* v0p = first ? nullptr : v0.data();
    auto loss = [&] {
      Vec out(n);
      value_mix_forward(v.data(), v0p, lambda.data(), out.data(), n);
      return weighted_sum(w, out);
    };
    Vec dv(n), dv0(n), dl(2);
    value_mix_backward(w.data(), v.data(), v0p, lambda.data(), dv.data(), first ? nullptr : dv0.data(), dl.data(), n);
    const std::string tag = first ? " (first layer)" : "";
    expect_gradient_matches("dv" + tag, v, dv, loss);
    expect_gradient_matches("dlambda" + tag, lambda, dl, loss);
    if (!first) expect_gradient_matches("dv0", v0, dv0, loss);
  }
}

TEST(OpGrad, ScaledAdd) {
  Rng rng(16);
  const int64_t n = 6;
  Vec x = random_vector(rng, n), y0 = random_vector(rng, n), s = {0.7}, w = random_vector(rng, n);
  auto loss = [&] {
    Vec y = y0;
    scaled_add_forward(x.data(), s[0], y.data(), n, true);
    return weighted_sum(w, y);
  };
  Vec dx(n), ds(1);
  scaled_add_backward(w.data(), x.data(), s[0], dx.data(), ds.data(), n);
  expect_gradient_matches("dx", x, dx, loss);
  expect_gradient_matches("ds", s, ds, loss);
}

TEST(OpGrad, LoraPerRowAdapters) {
  Rng rng(17);
  const LoraShape s{2, 3, 5, 4, 2};
  Vec x = random_vector(rng, 2 * 3 * 5), A = random_vector(rng, 2 * 2 * 5), B = random_vector(rng, 2 * 4 * 2);
  Vec w = random_vector(rng, 2 * 3 * 4);
  auto loss = [&] {
    Vec h(2 * 3 * 2), y(2 * 3 * 4);
    lora_forward(x.data(), A.data(), B.data(), h.data(), y.data(), s);
    return weighted_sum(w, y);
  };
  Vec h(2 * 3 * 2), y(2 * 3 * 4), dx(x.size()), dA(A.size()), dB(B.size());
  lora_forward(x.data(), A.data(), B.data(), h.data(), y.data(), s);
  lora_backward(w.data(), x.data(), A.data(), B.data(), h.data(), dx.data(), dA.data(), dB.data(), s);
  expect_gradient_matches("dx", x, dx, loss);
  expect_gradient_matches("dA", A, dA, loss);
  expect_gradient_matches("dB", B, dB, loss);
}
