// GpuModel: one transformer block (SPEC §3.4–3.6, §3.10), forward and backward, in the order of
// CpuModel's cpu_layer.cpp. Running gradients: bw.g (lane 0 / the residual) and bw.g1 (lane 1), fp32.
#include "backend/cuda/activation.h"
#include "backend/cuda/attention_reference.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/embedding.h"
#include "backend/cuda/gpu_model_impl.h"
#include "backend/cuda/head_gate.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/qk_norm_rope.h"
#include "backend/cuda/residual.h"
#include "backend/cuda/rmsnorm.h"
#include "backend/cuda/value.h"
#include "backend/cuda/xsa.h"
#include "core/error.h"

namespace pgolf::cuda {

// n [N, d] → y [N, q_dim]: qkv = n·[Wq; Wk; Wv]ᵀ (+ LoRA) → value path, QK-norm + RoPE + gain →
// attention; with selected_queries only the query tiles holding selected rows (selection.query_begin).
void GpuModel::Impl::forward_attention(int v, bool selected_queries) {
  const ModelConfig& m = cfg;
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  const LayerParams& p = lp[static_cast<size_t>(L.physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const int n = static_cast<int>(N);
  const QkShape qk_shape{N, T, H, Hkv, Dh, m.rope_dims};
  // The fused product leaves qkv's q and k columns out where no backward reads them, and serves no
  // adapter that adds to q or k before their norm.
  const bool fused = qkv_fused && (selective_forward || qkv_fused_everywhere) && !has_lora(LoraTarget::Q, v) &&
                     !has_lora(LoraTarget::K, v);
  if (fused)
    qkv_fused_forward(b.n, W16(p.w16_qkv), b.qkv, !selective_forward, P(p.q_gain), rope_cos, rope_sin, b.q, b.k,
                      b.q_rstd, b.k_rstd, qk_shape, d, stream);
  else
    linear(b.n, d, W16(p.w16_qkv), n, d, qkv_w, b.qkv, qkv_w, false, 0.f);
  lora_group_hidden(v, b.n);  // the q, k, v and o adapters' h in one product (o's is applied later)
  lora_forward(LoraTarget::Q, v, b.n, b.qkv, qkv_w);
  lora_forward(LoraTarget::K, v, b.n, b.qkv + qd, qkv_w);
  lora_forward(LoraTarget::V, v, b.n, b.qkv + qd + kvd, qkv_w);

  const bool mix = mixes_values(v);
  value_forward(b.qkv + qd + kvd, qkv_w, uses_ve(v) ? io.ve : nullptr, P_or_null(p.ve_scale),
                mix && v > 0 ? layers[0].v_raw : nullptr, mix ? P(p.vr_lambda) : nullptr, b.v_raw, b.v,
                ValueShape{N, kvd}, stream);
  const bf16* vals = mix ? b.v : b.v_raw;
  if (!fused)
    qk_norm_rope_forward(b.qkv, b.qkv + qd, qkv_w, P(p.q_gain), rope_cos, rope_sin, b.q, b.k, b.q_rstd, b.k_rstd,
                         qk_shape, stream);

  AttentionShape shape = attention_shape();
  if (selected_queries) shape.query_begin = selection.query_begin;
  if (Dh == kAttentionHeadDim) attention_forward(shape, b.q, b.k, vals, b.y, b.lse, stream, attention);
  else attention_reference_forward(shape, Dh, max_seqlen, b.q, b.k, vals, b.y, b.lse, stream);
}

// rows.y [R, q_dim] → XSA → gate → a = y·Woᵀ (+ LoRA_o(n)) [R, d] in b.a (R = rows.count).
void GpuModel::Impl::forward_attention_output(int v, const LayerRows& rows) {
  const LayerParams& p = lp[static_cast<size_t>(order[static_cast<size_t>(v)].physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const int64_t R = rows.count;
  const bf16* y = rows.y;
  if (p.xsa) {
    xsa_forward(y, rows.vals, b.y_xsa, R, H, Hkv, Dh, stream);
    y = b.y_xsa;
  }
  if (p.gate_w >= 0) {
    // Gated attention reads the normed input n; attn_gate is an nn.Linear (no late QAT).
    linear(rows.n, d, W16(p.w16_gate), static_cast<int>(R), d, H, b.gate_logits, gate_ld, true, 0.f);
    head_gate_forward(y, b.gate_logits, P(p.gate_b), b.gate, b.y_gated, HeadGateShape{R, H, Dh, gate_ld}, stream);
    y = b.y_gated;
  }
  linear(y, qd, W16(p.w16_o), static_cast<int>(R), qd, d, b.a, d, false, 0.f);
  lora_forward(LoraTarget::O, v, rows.n, b.a, d);
}

// bw.da (d a) → d n, written to bw.dn's storage and returned.
NormGrad GpuModel::Impl::backward_attention(int v) {
  const ModelConfig& m = cfg;
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  const LayerParams& p = lp[static_cast<size_t>(L.physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const int n = static_cast<int>(N);
  const bool mix = mixes_values(v);
  const bf16* vals = mix ? b.v : b.v_raw;
  const bf16* y_xsa = p.xsa ? b.y_xsa : b.y;  // the tensors fed to the gate and to Wo
  const bf16* y_wo = p.gate_w >= 0 ? b.y_gated : y_xsa;

  linear_dw(bw.da, d, y_wo, qd, n, qd, d, G(p.wo));
  linear_dx(bw.da, d, W16(p.w16_o), n, qd, d, bw.dy, false, 0.f);
  bf16* dy = bw.dy;
  bf16* spare = bw.dy2;
  if (p.gate_w >= 0) {
    head_gate_backward(dy, y_xsa, b.gate, spare, bw.dgate_logits, G(p.gate_b), HeadGateShape{N, H, Dh, gate_ld},
                       bw.reduce, stream);
    std::swap(dy, spare);
  }
  const AttentionShape shape = attention_shape();
  // XSA's backward holds dO and O: it also writes the flash backward's D, which then need not read them.
  const bool delta_ready = p.xsa && Dh == kAttentionHeadDim;
  if (p.xsa) {
    xsa_backward(dy, b.y, vals, spare, bw.dv_xsa, N, H, Hkv, Dh, stream,
                 delta_ready ? attention_backward_delta(shape, bw.attn_ws) : nullptr);
    std::swap(dy, spare);
  }
  QkDq dq(bw.dq);
  if (fold_dq_finish)
    dq = attention_backward_unfinished(shape, b.q, b.k, vals, b.y, b.lse, dy, bw.dk, bw.dv, bw.attn_ws,
                                       bw.attn_ws_bytes, stream, attention, delta_ready);
  else if (Dh == kAttentionHeadDim)
    attention_backward(shape, b.q, b.k, vals, b.y, b.lse, dy, bw.dq, bw.dk, bw.dv, bw.attn_ws, bw.attn_ws_bytes,
                       stream, attention, delta_ready);
  else
    attention_reference_backward(shape, Dh, max_seqlen, b.q, b.k, vals, b.y, b.lse, dy, bw.dq, bw.dk, bw.dv,
                                 bw.attn_ws, bw.attn_ws_bytes, stream);

  // q, k: gain, RoPE, QK-norm → the q and k columns of dqkv; v: XSA's share, the value path → its columns.
  qk_norm_rope_backward(dq, bw.dk, b.qkv, b.qkv + qd, qkv_w, b.q_rstd, b.k_rstd, P(p.q_gain), rope_cos, rope_sin,
                        bw.dqkv, bw.dqkv + qd, qkv_w, G(p.q_gain), QkShape{N, T, H, Hkv, Dh, m.rope_dims}, bw.reduce,
                        stream);
  const bool ve = uses_ve(v);
  value_backward(bw.dv, p.xsa ? bw.dv_xsa : nullptr, b.v_raw, mix && v > 0 ? layers[0].v_raw : nullptr,
                 mix ? P(p.vr_lambda) : nullptr, mix && v > 0 ? bw.dv0 : nullptr,
                 m.value_residual && v == 0 ? bw.dv0 : nullptr, ve ? io.ve : nullptr, P_or_null(p.ve_scale),
                 ve && wants_dve() ? bw.dve : nullptr, mix ? G(p.vr_lambda) : nullptr, ve ? G(p.ve_scale) : nullptr,
                 bw.dqkv + qd + kvd, qkv_w, ValueShape{N, kvd}, bw.reduce, stream,
                 ValueGradStart{v == first_dv0_layer(), v == first_dve_layer()});

  if (!frozen) {
    if (p.qkv_contiguous) {
      linear_dw(bw.dqkv, qkv_w, b.n, d, n, d, qkv_w, G(p.wq));
    } else {
      linear_dw(bw.dqkv, qkv_w, b.n, d, n, d, qd, G(p.wq));
      linear_dw(bw.dqkv + qd, qkv_w, b.n, d, n, d, kvd, G(p.wk));
      linear_dw(bw.dqkv + qd + kvd, qkv_w, b.n, d, n, d, kvd, G(p.wv));
    }
    if (p.gate_w >= 0) linear_dw(bw.dgate_logits, gate_ld, b.n, d, n, d, H, G(p.gate_w));
  }
  // The q, k and v products are one GEMM here; the references run three linears whose bf16 input
  // gradients autograd adds. Stored bf16 (no gate or LoRA term to add), d n is their sum rounded once: a
  // rounding of the size of theirs, which CpuModel's set_bf16_norm_grads repeats at this point.
  const bool sole = p.gate_w < 0 && !has_lora(LoraTarget::Q, v) && !has_lora(LoraTarget::K, v) &&
                    !has_lora(LoraTarget::V, v) && !has_lora(LoraTarget::O, v);
  const NormGrad dn = norm_grad_dx(bw.dqkv, qkv_w, W16(p.w16_qkv), n, d, qkv_w, bw.dn, sole);
  if (p.gate_w >= 0) linear_dx(bw.dgate_logits, gate_ld, W16(p.w16_gate), n, d, H, bw.dn, true, 1.f);
  lora_backward(LoraTarget::Q, v, bw.dqkv, qkv_w, b.n, bw.dn);
  lora_backward(LoraTarget::K, v, bw.dqkv + qd, qkv_w, b.n, bw.dn);
  lora_backward(LoraTarget::V, v, bw.dqkv + qd + kvd, qkv_w, b.n, bw.dn);
  lora_backward(LoraTarget::O, v, bw.da, d, b.n, bw.dn);
  lora_group_backward(v, b.n, bw.dn);
  side_join();  // the side read dqkv, d a and the LoRA scratch, which the layer below rewrites
  return dn;
}

// m_in [rows, d] (the normed MLP input) → b.f = act(m·Wfcᵀ)·Wprojᵀ (+ LoRA_mlp(m)) [rows, d].
void GpuModel::Impl::forward_mlp(int v, const bf16* m_in, int64_t rows) {
  const LayerParams& p = lp[static_cast<size_t>(order[static_cast<size_t>(v)].physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const int n = static_cast<int>(rows);
  const float slope = cfg.activation == Activation::Leaky2 ? static_cast<float>(cfg.leaky_slope) : 0.f;
  if (mlp_fused) {
    // pre only for the backward (none follows a selective forward).
    mlp_fused_forward(m_in, W16(p.w16_fc), selective_forward ? nullptr : b.pre, b.post, rows, d, hid, slope, stream);
  } else {
    linear(m_in, d, W16(p.w16_fc), n, d, hid, b.pre, hid, false, 0.f);
    leaky_relu_sq_forward(b.pre, b.post, rows * hid, slope, stream);
  }
  linear(b.post, hid, W16(p.w16_proj), n, hid, d, b.f, d, false, 0.f);
  lora_forward(LoraTarget::Mlp, v, m_in, b.f, d);
}

// bw.df (d f) → d m, written to bw.dm's storage and returned (bf16 unless a LoRA adapter adds to it).
NormGrad GpuModel::Impl::backward_mlp(int v) {
  const LayerParams& p = lp[static_cast<size_t>(order[static_cast<size_t>(v)].physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const int n = static_cast<int>(N);
  const float slope = cfg.activation == Activation::Leaky2 ? static_cast<float>(cfg.leaky_slope) : 0.f;
  linear_dw(bw.df, d, b.post, hid, n, hid, d, G(p.wproj));
  if (mlp_fused) {
    mlp_fused_backward(bw.df, W16(p.w16_proj), b.pre, bw.dpost, N, d, hid, slope, stream);
  } else {
    linear_dx(bw.df, d, W16(p.w16_proj), n, hid, d, bw.dpost, false, 0.f);
    leaky_relu_sq_backward(bw.dpost, b.pre, bw.dpost, N * hid, slope, stream);
  }
  linear_dw(bw.dpost, hid, b.m, d, n, d, hid, G(p.wfc));
  const NormGrad dm =
      norm_grad_dx(bw.dpost, hid, W16(p.w16_fc), n, d, hid, bw.dm, !has_lora(LoraTarget::Mlp, v));
  lora_backward(LoraTarget::Mlp, v, bw.df, d, b.m, bw.dm);
  side_join();  // the side read d f and the LoRA scratch
  return dm;
}

bool GpuModel::Impl::wants_dx0() const { return !frozen; }

bool GpuModel::Impl::uses_ve(int v) const {
  return lp[static_cast<size_t>(order[static_cast<size_t>(v)].physical)].ve_scale >= 0;
}

// The value embeddings' gradient feeds only their parameters, which a frozen base keeps.
bool GpuModel::Impl::wants_dve() const { return bw.dve != nullptr && !frozen; }

// The backward runs the layers from the last: the highest that adds into an accumulator writes it instead.
int GpuModel::Impl::first_dv0_layer() const {
  for (int v = static_cast<int>(order.size()) - 1; v > 0; --v)
    if (mixes_values(v)) return v;
  return -1;
}

int GpuModel::Impl::first_dve_layer() const {
  if (!wants_dve()) return -1;
  for (int v = static_cast<int>(order.size()) - 1; v >= 0; --v)
    if (uses_ve(v)) return v;
  return -1;
}

// Layer nv - 1 is the backward's first: it writes dx0 rather than adding to it (no clearing pass). Layer
// 0's input is x0 itself, so its d x goes into dx0 in the same pass, unless the lanes open there (their
// second gradient is added to d x after the layer).
Dx0Pass GpuModel::Impl::dx0_pass_of(int v) const {
  if (!wants_dx0()) return {};
  const int last = static_cast<int>(order.size()) - 1;
  return Dx0Pass{v == last, v == 0 && !order[0].opens_lanes};
}

// Plain block:    x_in = mix(x, x0); x_mid = x_in + attn_scale⊙(g_a⊙Attn(n)); out = x_mid + mlp_scale⊙(g_m⊙MLP(m))
// (out, and the skip into the next layer, computed by the next layer's mix when it is a plain block too)
// Parallel block: x_in = mix(lane0, x0); (lane0, lane1) = lanes(lane0, lane1, Attn(n), MLP(RMSNorm(lane1)))
// In the last layer of a selective forward (runs_selected_rows) everything after attention runs on the
// selected rows only: the norms' inputs are needed for all rows (keys and values), the rest is not.
bool GpuModel::Impl::mix_takes_branch_below(int v) const {
  if (v < 1 || v >= static_cast<int>(order.size())) return false;
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  return !L.parallel && !L.opens_lanes && !order[static_cast<size_t>(v - 1)].parallel;
}

void GpuModel::Impl::forward_layer(int v) {
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  const LayerParams& p = lp[static_cast<size_t>(L.physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const bool selected = runs_selected_rows() && v + 1 == static_cast<int>(order.size());
  if (mix_takes_branch_below(v)) {
    // Layer v−1's MLP branch (left by its forward_layer_rows) and the skip into v, in v's mix.
    const LayerParams& pb = lp[static_cast<size_t>(order[static_cast<size_t>(v - 1)].physical)];
    const LayerBuf& below = layers[static_cast<size_t>(v - 1)];
    // A selective forward keeps out only where a skip reads it later, and in not at all (backward only).
    ResidualBelow r{below.x_mid, below.f, P(pb.mlp_scale), P_or_null(pb.mlp_gate),
                    selective_forward && !is_skip_source(v - 1) ? nullptr : below.out};
    if (L.skip >= 0) {
      const int E = static_cast<int>(plan.encoder.size()), k = L.skip;
      r.s = layers[static_cast<size_t>(E - 1 - k)].out;
      r.w = P(gp.skip_weights) + int64_t{k} * d;
      r.skip_gate = gp.skip_gates >= 0 ? P(gp.skip_gates) + int64_t{k} * d : nullptr;
      r.in = selective_forward ? nullptr : b.in;
    }
    mix_norm_forward(nullptr, io.x0, P(p.resid_mix), b.x_in, b.n, b.n_rstd, N, d, p.ln_scale, stream, &r);
  } else {
    mix_norm_forward(b.x, io.x0, P(p.resid_mix), b.x_in, b.n, b.n_rstd, N, d, p.ln_scale, stream);
  }
  forward_attention(v, selected);
  forward_layer_rows(v, selected ? gather_selected_rows(v) : all_rows(v));
}

void GpuModel::Impl::forward_layer_rows(int v, const LayerRows& rows) {
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  const LayerParams& p = lp[static_cast<size_t>(L.physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  const int64_t R = rows.count;
  forward_attention_output(v, rows);
  if (!L.parallel) {
    branch_forward(rows.x_in, b.a, P(p.attn_scale), P_or_null(p.attn_gate), b.x_mid, b.m, b.m_rstd, R, d, p.ln_scale,
                   stream);
    forward_mlp(v, b.m, R);
    // Else the next layer's mix runs this branch (mix_takes_branch_below).
    if (!mix_takes_branch_below(v + 1))
      branch_forward(b.x_mid, b.f, P(p.mlp_scale), P_or_null(p.mlp_gate), b.out, nullptr, nullptr, R, d, 1.f, stream);
    return;
  }
  rmsnorm_forward(rows.lane1, nullptr, b.m, b.m_rstd, R, d, p.ln_scale, stream);
  forward_mlp(v, b.m, R);
  lanes_forward(rows.x, rows.lane1, b.a, b.f, P(p.attn_scale), P(p.mlp_scale), P(p.par_resid), P(p.par_post), b.out,
                b.out1, R, d, stream);
}

GpuModel::Impl::LayerRows GpuModel::Impl::all_rows(int v) const {
  const LayerBuf& b = layers[static_cast<size_t>(v)];
  return LayerRows{N, b.y, mixes_values(v) ? b.v : b.v_raw, b.n, b.x_in, b.x, b.lane1};
}

// The selected rows of what the query side reads, gathered into [M, ·] copies (exact: bf16 rows).
GpuModel::Impl::LayerRows GpuModel::Impl::gather_selected_rows(int v) {
  const LayerRows all = all_rows(v);
  const int64_t M = selection.rows;
  auto gather = [&](const bf16* src, int cols, bf16* dst) -> const bf16* {
    if (!src) return nullptr;
    embedding_forward(selection.index, src, M, cols, dst, EmbeddingAddends{}, stream);
    return dst;
  };
  const LayerParams& p = lp[static_cast<size_t>(order[static_cast<size_t>(v)].physical)];
  LayerRows r;
  r.count = M;
  r.y = gather(all.y, qd, selection.y);
  r.vals = p.xsa ? gather(all.vals, kvd, selection.vals) : nullptr;
  r.n = p.gate_w >= 0 ? gather(all.n, d, selection.n) : nullptr;
  if (order[static_cast<size_t>(v)].parallel) {
    r.x = gather(all.x, d, selection.x);
    r.lane1 = gather(all.lane1, d, selection.lane1);
  } else {
    r.x_in = gather(all.x_in, d, selection.x_in);
  }
  return r;
}

bool GpuModel::Impl::is_skip_source(int v) const {
  const int E = static_cast<int>(plan.encoder.size());
  return v < E && E - 1 - v < plan.num_skips;
}

// The gradient an encoder output receives through its skip connection (bw.d_enc), added into bw.g by the
// layer's first backward pass; null for the other layers.
const float* GpuModel::Impl::skip_grad_of(int v) const {
  const int E = static_cast<int>(plan.encoder.size());
  return is_skip_source(v) ? bw.d_enc[static_cast<size_t>(E - 1 - v)] : nullptr;
}

// Whether layer v's last pass (mix_norm_backward) can also run layer v−1's MLP-branch backward: both
// layers sequential, and the skip at v (whose backward runs in the same pass, on the same gradient) neither
// gated (the gate rewrites the gradient the branch needs) nor followed by v−1's own skip gradient (added to
// it for the branch, but not for the skip).
bool GpuModel::Impl::folds_mlp_branch_below(int v) const {
  if (v < 1) return false;
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  if (L.parallel || order[static_cast<size_t>(v - 1)].parallel) return false;
  return L.skip < 0 || (gp.skip_gates < 0 && !skip_grad_of(v - 1));
}

// The U-Net skip into layer v for its last pass (mix_norm_backward), which runs the skip's backward: d in
// → d x, the encoder output's gradient into bw.d_enc, the skip's parameter gradients. Empty without a skip.
SkipBelow GpuModel::Impl::skip_into(int v) {
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  if (L.skip < 0) return SkipBelow{};
  const int E = static_cast<int>(plan.encoder.size()), k = L.skip;
  const bool gated = gp.skip_gates >= 0;
  return SkipBelow{layers[static_cast<size_t>(E - 1 - k)].out,
                   P(gp.skip_weights) + int64_t{k} * d,
                   bw.d_enc[static_cast<size_t>(k)],
                   G(gp.skip_weights, int64_t{k} * d),
                   gated ? P(gp.skip_gates) + int64_t{k} * d : nullptr,
                   gated ? layers[static_cast<size_t>(v)].pre_skip : nullptr,
                   gated ? G(gp.skip_gates, int64_t{k} * d) : nullptr};
}

// Layer v's MLP branch (out = x_mid + mlp_scale⊙σ(mlp_gate)⊙f) for its backward: d f into bw.df.
BranchBelow GpuModel::Impl::mlp_branch_of(int v) {
  const LayerParams& p = lp[static_cast<size_t>(order[static_cast<size_t>(v)].physical)];
  return BranchBelow{layers[static_cast<size_t>(v)].f, P(p.mlp_scale), P_or_null(p.mlp_gate), skip_grad_of(v),
                     bw.df, G(p.mlp_scale), G(p.mlp_gate)};
}

// bw.g (and bw.g1 for parallel layers) hold d(output) on entry and d(input) on return; bw.dx0 accumulates
// (dx0_pass_of). The skip gradient of an encoder output (skip_grad_of) is added into bw.g first.
// mlp_branch_done: the MLP-branch backward (d f in bw.df, the branch's parameter gradients) already ran in
// layer v+1's last pass.
bool GpuModel::Impl::backward_layer(int v, bool mlp_branch_done) {
  const VirtualLayer& L = order[static_cast<size_t>(v)];
  const LayerParams& p = lp[static_cast<size_t>(L.physical)];
  LayerBuf& b = layers[static_cast<size_t>(v)];
  float* dx0 = wants_dx0() ? bw.dx0 : nullptr;
  if (!L.parallel) {
    // g: d out → (MLP branch) → d x_mid (+ the MLP norm) → (attention branch) → d x_in (+ the norm) → d x.
    if (!mlp_branch_done) {
      const BranchBelow mlp = mlp_branch_of(v);
      branch_backward(nullptr, bw.g, mlp.g_add, b.out, nullptr, mlp.a, mlp.branch_scale, mlp.gate, mlp.da, mlp.dscale,
                      mlp.dgate, N, d, 1.f, bw.reduce, stream);
    }
    const NormGrad dm = backward_mlp(v);
    branch_backward(dm, bw.g, nullptr, b.x_mid, b.m_rstd, b.a, P(p.attn_scale), P_or_null(p.attn_gate), bw.da,
                    G(p.attn_scale), G(p.attn_gate), N, d, p.ln_scale, bw.reduce, stream);
    const NormGrad dn = backward_attention(v);
    const bool fold = folds_mlp_branch_below(v);
    const BranchBelow below = fold ? mlp_branch_of(v - 1) : BranchBelow{};
    const SkipBelow skip = skip_into(v);
    mix_norm_backward(dn, bw.g, b.n_rstd, b.x, io.x0, P(p.resid_mix), bw.g, false, dx0, G(p.resid_mix), N, d,
                      p.ln_scale, bw.reduce, stream, fold ? &below : nullptr, L.skip >= 0 ? &skip : nullptr,
                      dx0_pass_of(v));
    return fold;
  }
  PG_CHECK(!mlp_branch_done, "GpuModel: a parallel layer's lanes backward cannot be folded into the layer above");
  const float* g_add = skip_grad_of(v);
  // g, g1: d lane0_out, d lane1_out → d lane0_in, d lane1_in.
  if (g_add) add_f32(bw.g, g_add, N * d, stream);
  lanes_backward(bw.g, bw.g1, b.x, b.lane1, b.a, b.f, P(p.attn_scale), P(p.mlp_scale), P(p.par_resid), P(p.par_post),
                 bw.da, bw.df, G(p.attn_scale), G(p.mlp_scale), G(p.par_resid), G(p.par_post), N, d, bw.reduce, stream);
  const NormGrad dm = backward_mlp(v);
  rmsnorm_backward(dm, b.lane1, nullptr, b.m_rstd, bw.g1, N, d, p.ln_scale, 1.f, true, stream);
  const NormGrad dn = backward_attention(v);
  const SkipBelow skip = skip_into(v);
  mix_norm_backward(dn, nullptr, b.n_rstd, b.x, io.x0, P(p.resid_mix), bw.g, true, dx0, G(p.resid_mix), N, d,
                    p.ln_scale, bw.reduce, stream, nullptr, L.skip >= 0 ? &skip : nullptr, dx0_pass_of(v));
  return false;
}

}  // namespace pgolf::cuda
