// CpuModel: construction, modes, the embedding and head, and the walk over the layer plan (forward
// and backward). The blocks themselves are in cpu_layer.cpp.
#include "model/cpu_model.h"

#include <cmath>

#include "backend/cpu/embedding.h"
#include "backend/cpu/fake_quant.h"
#include "backend/cpu/linear.h"
#include "backend/cpu/lora.h"
#include "backend/cpu/mixing.h"
#include "backend/cpu/ngram_hash.h"
#include "backend/cpu/parallel.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/cpu/smear.h"
#include "backend/cpu/softcap_ce.h"
#include "core/error.h"

namespace pgolf {

template <typename T>
int64_t CpuModel<T>::offset(const std::string& name) const {
  return params_.layout().offset(params_.layout().index_of(name));
}

template <typename T>
int64_t CpuModel<T>::offset_if(const std::string& name) const {
  return params_.layout().has(name) ? offset(name) : -1;
}

template <typename T>
CpuModel<T>::CpuModel(const ModelConfig& config)
    : cfg_(config), params_(ParamLayout(param_specs(config))), grads_(params_.layout()) {
  cpu::configure_cpu_threads();
  const ModelConfig& m = cfg_;
  const int64_t L = m.num_layers, d = m.model_dim, qd = m.q_dim(), kvd = m.kv_dim(), hid = m.mlp_hidden;
  PG_CHECK(!(m.branch_gates && m.parallel_start_layer > 0),
           "branch_gates (s600) and parallel lanes (s1560) are not combined by any reference; the parallel block "
           "has no branch gates");
  gp_.tok_emb = offset("tok_emb.weight");
  gp_.bigram_embed = offset_if("bigram.embed.weight");
  gp_.bigram_proj = offset_if("bigram.proj.weight");
  gp_.bigram_scale = offset_if("bigram.scale");
  gp_.bigram_direct = offset_if("bigram_emb.weight");
  gp_.smear_gate = offset_if("smear.gate");
  gp_.ve_embed = offset_if("ve_shared.embed.weight");
  gp_.ve_proj = offset_if("ve_shared.proj.weight");
  gp_.ve_scale = offset_if("ve_shared.scale");
  gp_.skip_weights = offset_if("skip_weights");
  gp_.skip_gates = offset_if("skip_gates");
  // bigram.proj and ve_shared.proj are CastedLinear in every stack that has them.
  if (gp_.bigram_proj >= 0) qat_matrices_.push_back({gp_.bigram_proj, d, m.bigram_dim});
  if (gp_.ve_proj >= 0) qat_matrices_.push_back({gp_.ve_proj, kvd, m.ve_dim});

  const int64_t par_resid = offset_if("parallel_resid_lambdas"), par_post = offset_if("parallel_post_lambdas");
  layer_params_.resize(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    LayerParams& p = layer_params_[static_cast<size_t>(i)];
    const std::string b = "blocks." + std::to_string(i) + ".";
    p.attn_scale = offset(b + "attn_scale");
    p.mlp_scale = offset(b + "mlp_scale");
    p.resid_mix = offset(b + "resid_mix");
    p.q_gain = offset(b + "attn.q_gain");
    p.vr_lambda = offset_if(b + "attn.vr_lambda");
    p.gate_w = offset_if(b + "attn.attn_gate.weight");
    p.gate_b = offset_if(b + "attn.attn_gate.bias");
    p.attn_gate = offset_if(b + "attn_gate");
    p.mlp_gate = offset_if(b + "mlp_gate");
    const int ve = m.ve_index(static_cast<int>(i));
    p.ve_scale = ve >= 0 ? offset("ve_layer_scales." + std::to_string(ve)) : -1;
    if (m.param_banks) {
      // Bank slices (SPEC §3.10): Q = qo[i], O = qo[L+i], K = kv[i], V = kv[L+i], up[i], down[i].
      const int64_t qo = offset("qo_bank"), kv = offset("kv_bank");
      p.wq = qo + i * qd * d;
      p.wo = qo + (L + i) * d * qd;
      p.wk = kv + i * kvd * d;
      p.wv = kv + (L + i) * kvd * d;
      p.wfc = offset("mlp_up_bank") + i * hid * d;
      p.wproj = offset("mlp_down_bank") + i * d * hid;
    } else {
      p.wq = offset(b + "attn.c_q.weight");
      p.wk = offset(b + "attn.c_k.weight");
      p.wv = offset(b + "attn.c_v.weight");
      p.wo = offset(b + "attn.proj.weight");
      p.wfc = offset(b + "mlp.fc.weight");
      p.wproj = offset(b + "mlp.proj.weight");
      for (Matrix mat : {Matrix{p.wq, qd, d}, Matrix{p.wk, kvd, d}, Matrix{p.wv, kvd, d}, Matrix{p.wo, d, qd},
                         Matrix{p.wfc, hid, d}, Matrix{p.wproj, d, hid}})
        qat_matrices_.push_back(mat);
    }
    if (par_resid >= 0) {
      p.par_resid = par_resid + 2 * i;
      p.par_post = par_post + 4 * i;
    }
    // ln_scale_factor = 1/sqrt(i+1) is a Python float; the fp32 multiply rounds it to fp32.
    p.ln_scale = m.ln_scale ? static_cast<T>(1.0 / std::sqrt(static_cast<double>(i + 1))) : T(1);
    p.xsa = m.xsa_on(static_cast<int>(i));
  }
  build_plan();
}

template <typename T>
void CpuModel<T>::set_looping(bool on) {
  looping_ = on;
  build_plan();
}

template <typename T>
void CpuModel<T>::build_plan() {
  plan_ = cfg_.layer_plan(looping_);
  order_ = plan_.encoder;
  order_.insert(order_.end(), plan_.decoder.begin(), plan_.decoder.end());
  // The references open the lanes at the first parallel decoder entry and keep them to the end;
  // a plain layer after a parallel one would read a stale residual there, so it is refused here.
  bool seen_parallel = false;
  for (int i : plan_.decoder) {
    const bool par = cfg_.parallel_on(i);
    PG_CHECK(par || !seen_parallel, "layer plan: decoder layer {} is not parallel but follows a parallel one", i);
    seen_parallel = seen_parallel || par;
  }
}

template <typename T>
void CpuModel<T>::prepare_qat() {
  qat_active_ = train_ && qat_ && !qat_matrices_.empty();
  if (!qat_active_) return;
  const auto all = params_.all();
  qat_weights_.assign(all.begin(), all.end());
  for (const Matrix& mat : qat_matrices_)
    cpu::fake_quant_int6_rows(P(mat.offset), qat_weights_.data() + mat.offset, mat.rows, mat.cols);
}

template <typename T>
const cpu::RopeTable& CpuModel<T>::rope_table(int64_t seq_len) {
  auto it = rope_tables_.find(seq_len);
  if (it == rope_tables_.end())
    it = rope_tables_
             .emplace(seq_len, cpu::make_rope_table(cfg_.rope_base_at(static_cast<int>(seq_len)), cfg_.rope_dims,
                                                    static_cast<int>(seq_len)))
             .first;
  return it->second;
}

template <typename T>
const typename LoraAdapters<T>::Adapter* CpuModel<T>::adapter(LoraTarget t, int slot) const {
  return lora_ ? lora_->find(t, slot) : nullptr;
}

template <typename T>
void CpuModel<T>::lora_forward(LoraTarget t, int slot, const T* x, std::vector<T>& h, T* y) {
  const auto* a = adapter(t, slot);
  if (!a) return;
  const cpu::LoraShape s{B_, T_, a->in, a->out, lora_->rank(), a->a_stride};
  h.resize(static_cast<size_t>(N_ * s.rank));
  const T* base = lora_->params().data();
  cpu::lora_forward(x, base + a->a_offset, base + a->b_offset, h.data(), y, s);
}

template <typename T>
void CpuModel<T>::lora_backward(LoraTarget t, int slot, const T* dy, const T* x, const std::vector<T>& h, T* dx) {
  const auto* a = adapter(t, slot);
  if (!a) return;
  const cpu::LoraShape s{B_, T_, a->in, a->out, lora_->rank(), a->a_stride};
  const T* base = lora_->params().data();
  T* grad = lora_->grads().data();
  cpu::lora_backward(dy, x, base + a->a_offset, base + a->b_offset, h.data(), dx, grad + a->a_offset,
                     grad + a->b_offset, s);
}

template <typename T>
typename CpuModel<T>::LinearInputs CpuModel<T>::linear_inputs(int v) const {
  PG_CHECK(v >= 0 && v < static_cast<int>(layers_.size()), "linear_inputs: no virtual layer {} in the last forward", v);
  const LayerActs& L = layers_[static_cast<size_t>(v)];
  const AttnActs& A = L.attn;
  const std::vector<T>& wo_in = !A.y_out.empty() ? A.y_out : (!A.y_xsa.empty() ? A.y_xsa : A.y);
  return {L.n, wo_in, L.mlp.m, L.mlp.post};
}

template <typename T>
std::span<const T> CpuModel<T>::layer_output(int v, int lane) const {
  const LayerActs& L = layers_.at(static_cast<size_t>(v));
  PG_CHECK(lane == 0 || (lane == 1 && L.parallel), "layer_output: virtual layer {} has no lane {}", v, lane);
  return lane == 0 ? L.out : L.out1;
}

template <typename T>
std::span<const T> CpuModel<T>::layer_activation(int v, const std::string& name) const {
  const LayerActs& L = layers_.at(static_cast<size_t>(v));
  const AttnActs& A = L.attn;
  const MlpActs& M = L.mlp;
  const std::pair<const char*, const std::vector<T>*> table[] = {
      {"x_in", &L.x_in}, {"n", &L.n},         {"q", &A.q}, {"k", &A.k_rope},   {"v", &values(A)},
      {"y", &A.y},       {"y_xsa", &A.y_xsa}, {"a", &A.a}, {"x_mid", &L.x_mid}, {"m", &M.m},
      {"pre", &M.pre},   {"post", &M.post},   {"f", &M.f}};
  for (const auto& [n, t] : table)
    if (name == n) return *t;
  fail("layer_activation: no activation named '{}'", name);
}

// ---- embedding -------------------------------------------------------------------------------------

template <typename T>
void CpuModel<T>::forward_embedding() {
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim;
  e_.resize(static_cast<size_t>(N_ * d));
  cpu::embedding_forward(ids_.data(), N_, P(gp_.tok_emb), m.vocab_size, d, e_.data());
  if (m.bigram_vocab_size > 0) {
    // bigram(ids) = ((E[bigram idx] (+ E[trigram idx])) · Pᵀ) · scale, added to the token embedding.
    const int64_t db = m.bigram_dim;
    bigram_idx_.resize(static_cast<size_t>(N_));
    cpu::bigram_hash_indices(ids_.data(), B_, T_, m.bigram_vocab_size, bigram_idx_.data());
    bigram_h_.resize(static_cast<size_t>(N_ * db));
    cpu::embedding_forward(bigram_idx_.data(), N_, P(gp_.bigram_embed), m.bigram_vocab_size, db, bigram_h_.data());
    if (m.trigram_hash) {
      trigram_idx_.resize(static_cast<size_t>(N_));
      cpu::trigram_hash_indices(ids_.data(), B_, T_, m.bigram_vocab_size, trigram_idx_.data());
      cpu::embedding_forward(trigram_idx_.data(), N_, P(gp_.bigram_embed), m.bigram_vocab_size, db, bigram_h_.data(),
                             true);
    }
    bigram_p_.resize(static_cast<size_t>(N_ * d));
    cpu::linear_forward(bigram_h_.data(), W(gp_.bigram_proj), bigram_p_.data(), N_, db, d);
    cpu::scaled_add_forward(bigram_p_.data(), *P(gp_.bigram_scale), e_.data(), N_ * d, true);
  }
  if (m.bigram_direct_size > 0) {
    bigram_idx_.resize(static_cast<size_t>(N_));
    cpu::direct_bigram_indices(ids_.data(), B_, T_, m.vocab_size, m.bigram_direct_size, bigram_idx_.data());
    cpu::embedding_forward(bigram_idx_.data(), N_, P(gp_.bigram_direct), m.bigram_direct_size, d, e_.data(), true);
  }
  x_norm_.resize(e_.size());
  e_rstd_.resize(static_cast<size_t>(N_));
  cpu::rmsnorm_forward(e_.data(), x_norm_.data(), e_rstd_.data(), N_, d);
  if (m.smear_gate) {
    x0_.resize(e_.size());
    cpu::smear_forward(x_norm_.data(), P(gp_.smear_gate), x0_.data(), B_, T_, d);
  } else {
    x0_ = x_norm_;
  }
  if (m.ve_enabled && !m.ve_layers.empty()) {
    // ve = (E_ve[ids] · P_veᵀ) · s_ve [N, kv_dim], shared by the VE layers.
    const int64_t kvd = m.kv_dim();
    ve_h_.resize(static_cast<size_t>(N_ * m.ve_dim));
    cpu::embedding_forward(ids_.data(), N_, P(gp_.ve_embed), m.vocab_size, m.ve_dim, ve_h_.data());
    ve_p_.resize(static_cast<size_t>(N_ * kvd));
    cpu::linear_forward(ve_h_.data(), W(gp_.ve_proj), ve_p_.data(), N_, m.ve_dim, kvd);
    ve_.resize(ve_p_.size());
    cpu::scaled_add_forward(ve_p_.data(), *P(gp_.ve_scale), ve_.data(), N_ * kvd, false);
  }
}

template <typename T>
void CpuModel<T>::backward_embedding(const T* dx0) {
  if (frozen_) return;  // nothing below x0 but parameters
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim;
  std::vector<T> dxn;
  const T* dnorm = dx0;
  if (m.smear_gate) {
    dxn.assign(static_cast<size_t>(N_ * d), T(0));
    cpu::smear_backward(dx0, x_norm_.data(), P(gp_.smear_gate), dxn.data(), G(gp_.smear_gate), B_, T_, d);
    dnorm = dxn.data();
  }
  std::vector<T> de(static_cast<size_t>(N_ * d), T(0));
  cpu::rmsnorm_backward(dnorm, e_.data(), e_rstd_.data(), de.data(), N_, d);
  cpu::embedding_backward(ids_.data(), N_, de.data(), d, G(gp_.tok_emb));
  if (m.bigram_vocab_size > 0) {
    const int64_t db = m.bigram_dim;
    std::vector<T> dp(static_cast<size_t>(N_ * d), T(0)), dh(static_cast<size_t>(N_ * db), T(0));
    cpu::scaled_add_backward(de.data(), bigram_p_.data(), *P(gp_.bigram_scale), dp.data(), G(gp_.bigram_scale),
                             N_ * d);
    cpu::linear_backward(dp.data(), bigram_h_.data(), W(gp_.bigram_proj), dh.data(), G(gp_.bigram_proj), N_, db, d);
    cpu::embedding_backward(bigram_idx_.data(), N_, dh.data(), db, G(gp_.bigram_embed));
    if (m.trigram_hash) cpu::embedding_backward(trigram_idx_.data(), N_, dh.data(), db, G(gp_.bigram_embed));
  }
  if (m.bigram_direct_size > 0) cpu::embedding_backward(bigram_idx_.data(), N_, de.data(), d, G(gp_.bigram_direct));
  if (m.ve_enabled && !m.ve_layers.empty()) {
    const int64_t kvd = m.kv_dim();
    std::vector<T> dp(static_cast<size_t>(N_ * kvd), T(0)), dh(static_cast<size_t>(N_ * m.ve_dim), T(0));
    cpu::scaled_add_backward(dve_.data(), ve_p_.data(), *P(gp_.ve_scale), dp.data(), G(gp_.ve_scale), N_ * kvd);
    cpu::linear_backward(dp.data(), ve_h_.data(), W(gp_.ve_proj), dh.data(), G(gp_.ve_proj), N_, m.ve_dim, kvd);
    cpu::embedding_backward(ids_.data(), N_, dh.data(), m.ve_dim, G(gp_.ve_embed));
  }
}

// ---- forward ---------------------------------------------------------------------------------------

template <typename T>
T CpuModel<T>::forward(const Batch& batch) {
  const ModelConfig& m = cfg_;
  batch.validate(m.vocab_size);
  build_plan();
  const int num_virtual = num_virtual_layers();
  if (lora_) {
    PG_CHECK(batch.rows <= lora_->rows(), "LoRA adapters have {} rows, the batch has {} (row b uses adapter b)",
             lora_->rows(), batch.rows);
    PG_CHECK(lora_->slots() == num_virtual, "LoRA adapters have {} slots, the layer plan has {} virtual layers",
             lora_->slots(), num_virtual);
  }
  B_ = batch.rows;
  T_ = batch.seq_len;
  N_ = batch.tokens();
  ids_ = batch.inputs;
  targets_ = batch.targets;
  cu_ = batch.segments();
  positions_.resize(static_cast<size_t>(N_));
  for (int64_t i = 0; i < N_; ++i) positions_[i] = static_cast<int32_t>(i % T_);  // RoPE positions restart per row
  rope_ = &rope_table(T_);
  prepare_qat();
  forward_embedding();

  const int E = static_cast<int>(plan_.encoder.size());
  const int64_t d = m.model_dim;
  layers_.resize(static_cast<size_t>(num_virtual));
  const std::vector<T>* x = &x0_;  // the residual stream (plain layers)
  const std::vector<T>* lane0 = nullptr;
  const std::vector<T>* lane1 = nullptr;
  for (int v = 0; v < num_virtual; ++v) {
    LayerActs& L = layers_[static_cast<size_t>(v)];
    const bool enc = v < E;
    const int k = v - E;
    L.physical = order_[static_cast<size_t>(v)];
    L.parallel = !enc && m.parallel_on(L.physical);
    L.opens_lanes = L.parallel && lane0 == nullptr;
    if (L.opens_lanes) lane0 = lane1 = x;
    const std::vector<T>& cur = L.parallel ? *lane0 : *x;
    // Decoder entry k pops the skip pushed by encoder entry E-1-k (LIFO); only the first num_skips do.
    L.skip = !enc && k < plan_.num_skips ? k : -1;
    if (L.skip >= 0) {
      L.pre_skip = cur;
      L.x.resize(cur.size());
      const T* gate = gp_.skip_gates >= 0 ? P(gp_.skip_gates) + k * d : nullptr;
      cpu::skip_add_forward(cur.data(), layers_[static_cast<size_t>(E - 1 - k)].out.data(),
                            P(gp_.skip_weights) + k * d, gate, L.x.data(), N_, d);
    } else {
      L.x = cur;
    }
    if (L.parallel) L.lane1 = *lane1;
    forward_layer(L, v);
    if (L.parallel) {
      lane0 = &L.out;
      lane1 = &L.out1;
    } else {
      x = &L.out;
    }
  }

  // Final hidden state: the residual, or the mean of the two lanes (s1560 "mean" final lane).
  if (lane0) {
    final_in_.resize(lane0->size());
    for (size_t i = 0; i < final_in_.size(); ++i) final_in_[i] = T(0.5) * ((*lane0)[i] + (*lane1)[i]);
  } else {
    final_in_ = *x;
  }
  h_.resize(final_in_.size());
  final_rstd_.resize(static_cast<size_t>(N_));
  cpu::rmsnorm_forward(final_in_.data(), h_.data(), final_rstd_.data(), N_, d);
  const int64_t V = m.vocab_size;
  logits_.resize(static_cast<size_t>(N_ * V));
  cpu::linear_forward(h_.data(), P(gp_.tok_emb), logits_.data(), N_, d, V);  // tied head: z = h · tok_embᵀ
  lora_forward(LoraTarget::Head, 0, h_.data(), lora_head_h_, logits_.data());
  const bool with_loss = !targets_.empty();
  losses_.assign(with_loss ? static_cast<size_t>(N_) : 0, T(0));
  lse_.resize(static_cast<size_t>(N_));
  cpu::softcap_ce_forward(logits_.data(), logits_.data(), with_loss ? targets_.data() : nullptr, losses_.data(),
                          lse_.data(), N_, V, static_cast<T>(m.logit_softcap));
  if (!with_loss) return T(0);
  double sum = 0;
  for (T l : losses_) sum += static_cast<double>(l);
  return static_cast<T>(sum / static_cast<double>(N_));
}

// ---- backward --------------------------------------------------------------------------------------

template <typename T>
void CpuModel<T>::backward() {
  PG_CHECK(!targets_.empty(), "backward: the last forward had no targets");
  std::vector<T> w(static_cast<size_t>(N_), static_cast<T>(1.0 / static_cast<double>(N_)));
  backward_from(w);
}

template <typename T>
void CpuModel<T>::backward(std::span<const T> token_weights) {
  PG_CHECK(!targets_.empty(), "backward: the last forward had no targets");
  PG_CHECK(static_cast<int64_t>(token_weights.size()) == N_, "backward: {} token weights for {} tokens",
           token_weights.size(), N_);
  backward_from(token_weights);
}

template <typename T>
void CpuModel<T>::backward_from(std::span<const T> dloss) {
  const ModelConfig& m = cfg_;
  const int64_t d = m.model_dim, V = m.vocab_size;
  std::vector<T> dz(static_cast<size_t>(N_ * V));
  cpu::softcap_ce_backward(logits_.data(), lse_.data(), targets_.data(), dloss.data(), dz.data(), N_, V,
                           static_cast<T>(m.logit_softcap));
  std::vector<T> dh(static_cast<size_t>(N_ * d), T(0));
  cpu::linear_backward(dz.data(), h_.data(), P(gp_.tok_emb), dh.data(), G(gp_.tok_emb), N_, d, V);
  lora_backward(LoraTarget::Head, 0, dz.data(), h_.data(), lora_head_h_, dh.data());
  if (bf16_norm_grads_ && !adapter(LoraTarget::Head, 0)) cpu::round_to_bf16(dh.data(), N_ * d);
  dz = {};
  std::vector<T> g(static_cast<size_t>(N_ * d), T(0)), g1;
  cpu::rmsnorm_backward(dh.data(), final_in_.data(), final_rstd_.data(), g.data(), N_, d);

  dx0_.assign(static_cast<size_t>(N_ * d), T(0));
  dve_.assign(ve_.size(), T(0));
  dv0_.assign(layers_.empty() ? 0 : layers_[0].attn.v_raw.size(), T(0));
  const int num_virtual = num_virtual_layers(), E = static_cast<int>(plan_.encoder.size());
  if (layers_.back().parallel) {
    for (auto& x : g) x *= T(0.5);
    g1 = g;
  }
  // Gradients reaching the encoder outputs through the skip connections.
  std::vector<std::vector<T>> d_enc(static_cast<size_t>(E));
  for (int v = num_virtual - 1; v >= 0; --v) {
    LayerActs& L = layers_[static_cast<size_t>(v)];
    if (v < E && !d_enc[static_cast<size_t>(v)].empty())
      for (size_t i = 0; i < g.size(); ++i) g[i] += d_enc[static_cast<size_t>(v)][i];
    backward_layer(L, v, g, g1);
    if (L.skip >= 0) {
      const int k = L.skip;
      std::vector<T>& ds = d_enc[static_cast<size_t>(E - 1 - k)];
      ds.assign(g.size(), T(0));
      std::vector<T> dpre(g.size(), T(0));
      const T* gate = gp_.skip_gates >= 0 ? P(gp_.skip_gates) + k * d : nullptr;
      cpu::skip_add_backward(g.data(), L.pre_skip.data(), layers_[static_cast<size_t>(E - 1 - k)].out.data(),
                             P(gp_.skip_weights) + k * d, gate, dpre.data(), ds.data(), G(gp_.skip_weights, k * d),
                             G(gp_.skip_gates, k * d), N_, d);
      g.swap(dpre);
    }
    if (L.opens_lanes)
      for (size_t i = 0; i < g.size(); ++i) g[i] += g1[i];
  }
  for (size_t i = 0; i < g.size(); ++i) dx0_[i] += g[i];
  backward_embedding(dx0_.data());
}

template class CpuModel<float>;
template class CpuModel<double>;

}  // namespace pgolf
