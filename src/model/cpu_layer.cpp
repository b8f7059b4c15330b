// CpuModel: one transformer block (SPEC §3.4–3.6, §3.10), forward and backward. Shapes: N tokens,
// d = model_dim, H / Hkv heads of Dh dims, q_dim = H·Dh, kv_dim = Hkv·Dh, hidden = MLP width.
#include <cmath>

#include "backend/cpu/activation.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/head_gate.h"
#include "backend/cpu/linear.h"
#include "backend/cpu/mixing.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/cpu/rope.h"
#include "backend/cpu/xsa.h"
#include "model/cpu_model.h"

namespace pgolf {

namespace {
template <typename T>
std::vector<T> zeros(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n), T(0));
}
}  // namespace

// n [N, d] → a [N, d]:
//   q = n·Wqᵀ (+LoRA), k = n·Wkᵀ (+LoRA), v = n·Wvᵀ (+LoRA) (+ λ_ve·ve) → value residual mix
//   q, k ← RMSNorm per head, RoPE; q ← q·gain; y = attention(q, k, v); y ← XSA(y, v); y ← y·gate
//   a = y·Woᵀ (+ LoRA_o(n))
template <typename T>
void CpuModel<T>::forward_attention(LayerActs& L, const LayerParams& p, int v) {
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim, qd = m.q_dim(), kvd = m.kv_dim();
  const int H = m.num_heads, Hkv = m.num_kv_heads, Dh = m.head_dim;
  AttnActs& A = L.attn;
  const T* n = L.n.data();
  A.q_lin.resize(static_cast<size_t>(N_ * qd));
  A.k_lin.resize(static_cast<size_t>(N_ * kvd));
  A.v_raw.resize(static_cast<size_t>(N_ * kvd));
  cpu::linear_forward(n, W(p.wq), A.q_lin.data(), N_, d, qd);
  lora_forward(LoraTarget::Q, v, n, A.lora_q, A.q_lin.data());
  cpu::linear_forward(n, W(p.wk), A.k_lin.data(), N_, d, kvd);
  lora_forward(LoraTarget::K, v, n, A.lora_k, A.k_lin.data());
  cpu::linear_forward(n, W(p.wv), A.v_raw.data(), N_, d, kvd);
  lora_forward(LoraTarget::V, v, n, A.lora_v, A.v_raw.data());
  if (p.ve_scale >= 0) cpu::scaled_add_forward(ve_.data(), *P(p.ve_scale), A.v_raw.data(), N_ * kvd, true);
  if (m.value_residual) {
    // Value residual: v0 = the raw v of the first virtual layer; that layer scales v by (λ0+λ1)
    // (S562) or keeps it (#549 code), later layers use λ0·v0 + λ1·v.
    A.v.resize(A.v_raw.size());
    if (v == 0 && !m.value_residual_layer0_mix)
      A.v = A.v_raw;
    else
      cpu::value_mix_forward(A.v_raw.data(), v == 0 ? nullptr : layers_[0].attn.v_raw.data(), P(p.vr_lambda),
                             A.v.data(), N_ * kvd);
  }
  const std::vector<T>& vals = values(A);

  A.q_rope.resize(A.q_lin.size());
  A.q_rstd.resize(static_cast<size_t>(N_ * H));
  cpu::rmsnorm_forward(A.q_lin.data(), A.q_rope.data(), A.q_rstd.data(), N_ * H, Dh);
  cpu::rope_forward(A.q_rope.data(), positions_.data(), *rope_, N_, H, Dh);
  A.k_rope.resize(A.k_lin.size());
  A.k_rstd.resize(static_cast<size_t>(N_ * Hkv));
  cpu::rmsnorm_forward(A.k_lin.data(), A.k_rope.data(), A.k_rstd.data(), N_ * Hkv, Dh);
  cpu::rope_forward(A.k_rope.data(), positions_.data(), *rope_, N_, Hkv, Dh);
  A.q.resize(A.q_rope.size());
  cpu::head_scale_forward(A.q_rope.data(), P(p.q_gain), A.q.data(), N_, H, Dh);

  const cpu::AttentionShape shape{N_, H, Hkv, Dh};
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(Dh)));
  A.y.resize(A.q.size());
  A.lse.resize(static_cast<size_t>(N_ * H));
  cpu::attention_forward(A.q.data(), A.k_rope.data(), vals.data(), A.y.data(), A.lse.data(), cu_.data(),
                         static_cast<int64_t>(cu_.size()) - 1, shape, scale);
  const T* y = A.y.data();
  if (p.xsa) {
    A.y_xsa.resize(A.y.size());
    cpu::xsa_forward(y, vals.data(), A.y_xsa.data(), N_, H, Hkv, Dh);
    y = A.y_xsa.data();
  }
  if (p.gate_w >= 0) {
    // Gated attention reads the normed input n; attn_gate is an nn.Linear (not CastedLinear: no QAT).
    A.gate_logits.resize(static_cast<size_t>(N_ * H));
    cpu::linear_forward(n, P(p.gate_w), A.gate_logits.data(), N_, d, H);
    A.gate.resize(A.gate_logits.size());
    A.y_out.resize(A.y.size());
    cpu::head_gate_forward(y, A.gate_logits.data(), P(p.gate_b), A.gate.data(), A.y_out.data(), N_, H, Dh);
    y = A.y_out.data();
  }
  A.a.resize(static_cast<size_t>(N_ * d));
  cpu::linear_forward(y, W(p.wo), A.a.data(), N_, qd, d);
  lora_forward(LoraTarget::O, v, n, A.lora_o, A.a.data());
}

template <typename T>
void CpuModel<T>::backward_attention(LayerActs& L, const LayerParams& p, int v, const T* da, T* dn) {
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim, qd = m.q_dim(), kvd = m.kv_dim();
  const int H = m.num_heads, Hkv = m.num_kv_heads, Dh = m.head_dim;
  AttnActs& A = L.attn;
  const T* n = L.n.data();
  const std::vector<T>& vals = values(A);
  // The tensor fed to Wo and the ones before it (XSA output, attention output).
  const T* y_att = A.y.data();
  const T* y_xsa = p.xsa ? A.y_xsa.data() : y_att;
  const T* y_wo = p.gate_w >= 0 ? A.y_out.data() : y_xsa;

  std::vector<T> dy = zeros<T>(N_ * qd);
  cpu::linear_backward(da, y_wo, W(p.wo), dy.data(), G(p.wo), N_, qd, d);
  lora_backward(LoraTarget::O, v, da, n, A.lora_o, dn);
  if (p.gate_w >= 0) {
    std::vector<T> dy_in = zeros<T>(N_ * qd), dlogits = zeros<T>(N_ * H);
    cpu::head_gate_backward(dy.data(), y_xsa, A.gate.data(), dy_in.data(), dlogits.data(), G(p.gate_b), N_, H, Dh);
    cpu::linear_backward(dlogits.data(), n, P(p.gate_w), dn, G(p.gate_w), N_, d, H);
    dy.swap(dy_in);
  }
  std::vector<T> dv = zeros<T>(N_ * kvd);
  if (p.xsa) {
    std::vector<T> dy_in = zeros<T>(N_ * qd);
    cpu::xsa_backward(dy.data(), y_att, vals.data(), dy_in.data(), dv.data(), N_, H, Hkv, Dh);
    dy.swap(dy_in);
  }
  std::vector<T> dq = zeros<T>(N_ * qd), dk = zeros<T>(N_ * kvd);
  const cpu::AttentionShape shape{N_, H, Hkv, Dh};
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(Dh)));
  cpu::attention_backward(dy.data(), A.q.data(), A.k_rope.data(), vals.data(), A.y.data(), A.lse.data(), dq.data(),
                          dk.data(), dv.data(), cu_.data(), static_cast<int64_t>(cu_.size()) - 1, shape, scale);
  dy = {};

  // q: gain, RoPE (transpose rotation), per-head RMSNorm, then the projection.
  std::vector<T> dq_rope = zeros<T>(N_ * qd);
  cpu::head_scale_backward(dq.data(), A.q_rope.data(), P(p.q_gain), dq_rope.data(), G(p.q_gain), N_, H, Dh);
  cpu::rope_backward(dq_rope.data(), positions_.data(), *rope_, N_, H, Dh);
  std::fill(dq.begin(), dq.end(), T(0));
  cpu::rmsnorm_backward(dq_rope.data(), A.q_lin.data(), A.q_rstd.data(), dq.data(), N_ * H, Dh);
  cpu::rope_backward(dk.data(), positions_.data(), *rope_, N_, Hkv, Dh);
  std::vector<T> dk_lin = zeros<T>(N_ * kvd);
  cpu::rmsnorm_backward(dk.data(), A.k_lin.data(), A.k_rstd.data(), dk_lin.data(), N_ * Hkv, Dh);

  // v: through the value-residual mix to the raw projection (and to v0 of the first layer).
  std::vector<T> dv_raw;
  if (m.value_residual && !(v == 0 && !m.value_residual_layer0_mix)) {
    dv_raw = zeros<T>(N_ * kvd);
    cpu::value_mix_backward(dv.data(), A.v_raw.data(), v == 0 ? nullptr : layers_[0].attn.v_raw.data(),
                            P(p.vr_lambda), dv_raw.data(), v == 0 ? nullptr : dv0_.data(), G(p.vr_lambda), N_ * kvd);
  } else {
    dv_raw.swap(dv);
  }
  if (m.value_residual && v == 0)
    for (size_t i = 0; i < dv_raw.size(); ++i) dv_raw[i] += dv0_[i];  // complete: later layers ran first
  if (p.ve_scale >= 0) cpu::scaled_add_backward(dv_raw.data(), ve_.data(), *P(p.ve_scale), dve_.data(), G(p.ve_scale), N_ * kvd);

  cpu::linear_backward(dq.data(), n, W(p.wq), dn, G(p.wq), N_, d, qd);
  lora_backward(LoraTarget::Q, v, dq.data(), n, A.lora_q, dn);
  cpu::linear_backward(dk_lin.data(), n, W(p.wk), dn, G(p.wk), N_, d, kvd);
  lora_backward(LoraTarget::K, v, dk_lin.data(), n, A.lora_k, dn);
  cpu::linear_backward(dv_raw.data(), n, W(p.wv), dn, G(p.wv), N_, d, kvd);
  lora_backward(LoraTarget::V, v, dv_raw.data(), n, A.lora_v, dn);
  // GpuModel's one q/k/v GEMM rounds their sum once (set_bf16_norm_grads).
  const bool sole = p.gate_w < 0 && !adapter(LoraTarget::Q, v) && !adapter(LoraTarget::K, v) &&
                    !adapter(LoraTarget::V, v) && !adapter(LoraTarget::O, v);
  if (bf16_norm_grads_ && sole) cpu::round_to_bf16(dn, N_ * d);
}

// input [N, d] → f [N, d]: m = RMSNorm(input)·s, f = act(m·Wfcᵀ)·Wprojᵀ (+ LoRA_mlp(m)).
template <typename T>
void CpuModel<T>::forward_mlp(MlpActs& M, const LayerParams& p, const T* input, int v) {
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim, hid = m.mlp_hidden;
  M.m.resize(static_cast<size_t>(N_ * d));
  M.m_rstd.resize(static_cast<size_t>(N_));
  cpu::rmsnorm_forward(input, M.m.data(), M.m_rstd.data(), N_, d, p.ln_scale);
  M.pre.resize(static_cast<size_t>(N_ * hid));
  cpu::linear_forward(M.m.data(), W(p.wfc), M.pre.data(), N_, d, hid);
  M.post.resize(M.pre.size());
  const T slope = m.activation == Activation::Leaky2 ? static_cast<T>(m.leaky_slope) : T(0);
  cpu::leaky_relu_sq_forward(M.pre.data(), M.post.data(), N_ * hid, slope);
  M.f.resize(static_cast<size_t>(N_ * d));
  cpu::linear_forward(M.post.data(), W(p.wproj), M.f.data(), N_, hid, d);
  lora_forward(LoraTarget::Mlp, v, M.m.data(), M.lora_h, M.f.data());
}

template <typename T>
void CpuModel<T>::backward_mlp(MlpActs& M, const LayerParams& p, const T* input, int v, const T* df, T* dinput) {
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim, hid = m.mlp_hidden;
  std::vector<T> dpost = zeros<T>(N_ * hid), dm = zeros<T>(N_ * d);
  cpu::linear_backward(df, M.post.data(), W(p.wproj), dpost.data(), G(p.wproj), N_, hid, d);
  lora_backward(LoraTarget::Mlp, v, df, M.m.data(), M.lora_h, dm.data());
  std::vector<T> dpre = zeros<T>(N_ * hid);
  const T slope = m.activation == Activation::Leaky2 ? static_cast<T>(m.leaky_slope) : T(0);
  cpu::leaky_relu_sq_backward(dpost.data(), M.pre.data(), dpre.data(), N_ * hid, slope);
  dpost = {};
  cpu::linear_backward(dpre.data(), M.m.data(), W(p.wfc), dm.data(), G(p.wfc), N_, d, hid);
  if (bf16_norm_grads_ && !adapter(LoraTarget::Mlp, v)) cpu::round_to_bf16(dm.data(), N_ * d);
  cpu::rmsnorm_backward(dm.data(), input, M.m_rstd.data(), dinput, N_, d, p.ln_scale);
}

// Plain block:    x_in = mix(x, x0); x_mid = x_in + attn_scale⊙(g_a⊙Attn(n)); out = x_mid + mlp_scale⊙(g_m⊙MLP(x_mid))
// Parallel block: x_in = mix(lane0, x0); a = attn_scale⊙Attn(n); f = mlp_scale⊙MLP(lane1);
//                 (lane0, lane1) = lane_update(lane0, lane1, a, f)
template <typename T>
void CpuModel<T>::forward_layer(LayerActs& L, int v) {
  const LayerParams& p = layer_params_[static_cast<size_t>(L.physical)];
  const int64_t d = cfg_.model_dim;
  L.x_in.resize(L.x.size());
  cpu::resid_mix_forward(L.x.data(), x0_.data(), P(p.resid_mix), L.x_in.data(), N_, d);
  L.n.resize(L.x.size());
  L.n_rstd.resize(static_cast<size_t>(N_));
  cpu::rmsnorm_forward(L.x_in.data(), L.n.data(), L.n_rstd.data(), N_, d, p.ln_scale);
  forward_attention(L, p, v);
  if (!L.parallel) {
    L.x_mid.resize(L.x.size());
    cpu::branch_add_forward(L.x_in.data(), L.attn.a.data(), P(p.attn_scale), P_or_null(p.attn_gate), L.x_mid.data(),
                            N_, d);
    forward_mlp(L.mlp, p, L.x_mid.data(), v);
    L.out.resize(L.x.size());
    cpu::branch_add_forward(L.x_mid.data(), L.mlp.f.data(), P(p.mlp_scale), P_or_null(p.mlp_gate), L.out.data(), N_,
                            d);
    return;
  }
  L.a_scaled.resize(L.x.size());
  cpu::branch_add_forward<T>(nullptr, L.attn.a.data(), P(p.attn_scale), nullptr, L.a_scaled.data(), N_, d);
  forward_mlp(L.mlp, p, L.lane1.data(), v);
  L.f_scaled.resize(L.x.size());
  cpu::branch_add_forward<T>(nullptr, L.mlp.f.data(), P(p.mlp_scale), nullptr, L.f_scaled.data(), N_, d);
  L.out.resize(L.x.size());
  L.out1.resize(L.x.size());
  cpu::lane_update_forward(L.x.data(), L.lane1.data(), L.a_scaled.data(), L.f_scaled.data(), P(p.par_resid),
                           P(p.par_post), L.out.data(), L.out1.data(), N_, d);
}

template <typename T>
void CpuModel<T>::backward_layer(LayerActs& L, int v, std::vector<T>& g, std::vector<T>& g1) {
  const LayerParams& p = layer_params_[static_cast<size_t>(L.physical)];
  const int64_t d = cfg_.model_dim;
  std::vector<T> da = zeros<T>(N_ * d), dn = zeros<T>(N_ * d), df = zeros<T>(N_ * d);
  if (!L.parallel) {
    // g: d out → d x_mid (identity path + MLP branch) → d x_in (+ attention branch) → d x.
    cpu::branch_add_backward(g.data(), L.mlp.f.data(), P(p.mlp_scale), P_or_null(p.mlp_gate), df.data(),
                             G(p.mlp_scale), G(p.mlp_gate), N_, d);
    backward_mlp(L.mlp, p, L.x_mid.data(), v, df.data(), g.data());
    cpu::branch_add_backward(g.data(), L.attn.a.data(), P(p.attn_scale), P_or_null(p.attn_gate), da.data(),
                             G(p.attn_scale), G(p.attn_gate), N_, d);
    backward_attention(L, p, v, da.data(), dn.data());
    cpu::rmsnorm_backward(dn.data(), L.x_in.data(), L.n_rstd.data(), g.data(), N_, d, p.ln_scale);
    std::vector<T> dx = zeros<T>(N_ * d);
    cpu::resid_mix_backward(g.data(), L.x.data(), x0_.data(), P(p.resid_mix), dx.data(), dx0_.data(), G(p.resid_mix),
                            N_, d);
    g.swap(dx);
    return;
  }
  // g, g1: d lane0_out, d lane1_out → d lane0_in, d lane1_in.
  std::vector<T> dl0 = zeros<T>(N_ * d), dl1 = zeros<T>(N_ * d), da_s = zeros<T>(N_ * d), df_s = zeros<T>(N_ * d);
  cpu::lane_update_backward(g.data(), g1.data(), L.x.data(), L.lane1.data(), L.a_scaled.data(), L.f_scaled.data(),
                            P(p.par_resid), P(p.par_post), dl0.data(), dl1.data(), da_s.data(), df_s.data(),
                            G(p.par_resid), G(p.par_post), N_, d);
  cpu::branch_add_backward<T>(df_s.data(), L.mlp.f.data(), P(p.mlp_scale), nullptr, df.data(), G(p.mlp_scale),
                              nullptr, N_, d);
  backward_mlp(L.mlp, p, L.lane1.data(), v, df.data(), dl1.data());
  cpu::branch_add_backward<T>(da_s.data(), L.attn.a.data(), P(p.attn_scale), nullptr, da.data(), G(p.attn_scale),
                              nullptr, N_, d);
  backward_attention(L, p, v, da.data(), dn.data());
  std::vector<T> dx_in = zeros<T>(N_ * d);
  cpu::rmsnorm_backward(dn.data(), L.x_in.data(), L.n_rstd.data(), dx_in.data(), N_, d, p.ln_scale);
  cpu::resid_mix_backward(dx_in.data(), L.x.data(), x0_.data(), P(p.resid_mix), dl0.data(), dx0_.data(),
                          G(p.resid_mix), N_, d);
  g.swap(dl0);
  g1.swap(dl1);
}

// The class is instantiated in cpu_model.cpp; the members defined here are instantiated here.
#define PG_INSTANTIATE_LAYER(T)                                                                                \
  template void CpuModel<T>::forward_attention(LayerActs&, const LayerParams&, int);                          \
  template void CpuModel<T>::backward_attention(LayerActs&, const LayerParams&, int, const T*, T*);           \
  template void CpuModel<T>::forward_mlp(MlpActs&, const LayerParams&, const T*, int);                        \
  template void CpuModel<T>::backward_mlp(MlpActs&, const LayerParams&, const T*, int, const T*, T*);         \
  template void CpuModel<T>::forward_layer(LayerActs&, int);                                                  \
  template void CpuModel<T>::backward_layer(LayerActs&, int, std::vector<T>&, std::vector<T>&);

PG_INSTANTIATE_LAYER(float)
PG_INSTANTIATE_LAYER(double)

}  // namespace pgolf
