#include "model/config.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace pgolf {

const char* param_group_name(ParamGroup g) {
  switch (g) {
    case ParamGroup::Embed: return "embed";
    case ParamGroup::Matrix: return "matrix";
    case ParamGroup::Scalar: return "scalar";
  }
  return "?";
}

ModelConfig ModelConfig::from_config(const Config& c) {
  ModelConfig m;
  m.vocab_size = static_cast<int>(c.get_int("vocab_size"));
  m.num_layers = static_cast<int>(c.get_int("num_layers"));
  m.model_dim = static_cast<int>(c.get_int("model_dim"));
  m.num_heads = static_cast<int>(c.get_int("num_heads"));
  m.num_kv_heads = static_cast<int>(c.get_int("num_kv_heads"));
  PG_CHECK(m.vocab_size > 0 && m.vocab_size <= 65536, "vocab_size {} must be in 1..65536 (shards hold uint16 ids)",
           m.vocab_size);
  PG_CHECK(m.num_layers > 0, "num_layers must be positive, got {}", m.num_layers);
  PG_CHECK(m.num_heads > 0 && m.model_dim % m.num_heads == 0, "model_dim {} is not divisible by num_heads {}",
           m.model_dim, m.num_heads);
  PG_CHECK(m.num_kv_heads > 0 && m.num_heads % m.num_kv_heads == 0,
           "num_heads {} is not a multiple of num_kv_heads {}", m.num_heads, m.num_kv_heads);
  m.head_dim = m.model_dim / m.num_heads;
  double mult = c.get_double("mlp_mult");
  m.mlp_hidden = static_cast<int>(std::lround(mult * m.model_dim));
  PG_CHECK(m.mlp_hidden > 0, "mlp_mult {} gives no hidden units", mult);
  std::string act = c.get_string("activation");
  if (act == "relu2") m.activation = Activation::Relu2;
  else if (act == "leaky2") m.activation = Activation::Leaky2;
  else fail("activation '{}' is not one of relu2, leaky2", act);
  m.leaky_slope = c.get_double("leaky_slope");
  PG_CHECK(c.get_bool("tie_embeddings"), "tie_embeddings = false is not implemented (every reference ties)");
  m.logit_softcap = c.get_double("logit_softcap");
  m.rope_base = c.get_double("rope_base");
  int rd = static_cast<int>(c.get_int("rope_dims"));
  m.rope_dims = rd == 0 ? m.head_dim : rd;
  PG_CHECK(m.rope_dims > 0 && m.rope_dims <= m.head_dim && m.rope_dims % 2 == 0,
           "rope_dims {} must be even and at most the head dim {}", m.rope_dims, m.head_dim);
  m.rope_ntk_ref_len = static_cast<int>(c.get_int("rope_ntk_ref_len"));
  PG_CHECK(m.rope_ntk_ref_len == 0 || m.rope_dims > 2, "the NTK rope rule needs rope_dims > 2");
  m.qk_gain_init = c.get_double("qk_gain_init");
  m.ln_scale = c.get_bool("ln_scale");
  m.smear_gate = c.get_bool("smear_gate");
  m.bigram_vocab_size = static_cast<int>(c.get_int("bigram_vocab_size"));
  m.bigram_dim = static_cast<int>(c.get_int("bigram_dim"));
  PG_CHECK(m.bigram_vocab_size == 0 || m.bigram_vocab_size >= 2, "bigram_vocab_size {} needs at least 2 buckets",
           m.bigram_vocab_size);
  m.trigram_hash = c.get_bool("trigram_hash");
  PG_CHECK(!m.trigram_hash || m.bigram_vocab_size > 0, "trigram_hash needs the bigram table (bigram_vocab_size > 0)");
  m.bigram_direct_size = static_cast<int>(c.get_int("bigram_direct_size"));
  PG_CHECK(m.bigram_direct_size == 0 || m.bigram_vocab_size == 0,
           "bigram_direct_size and bigram_vocab_size are two different bigram tables; use one");
  m.branch_gates = c.get_bool("branch_gates");
  m.xsa_last_n = static_cast<int>(c.get_int("xsa_last_n"));
  PG_CHECK(m.xsa_last_n >= 0 && m.xsa_last_n <= m.num_layers, "xsa_last_n {} outside 0..{}", m.xsa_last_n,
           m.num_layers);
  m.ve_enabled = c.get_bool("ve_enabled");
  m.ve_dim = static_cast<int>(c.get_int("ve_dim"));
  if (m.ve_enabled) {
    for (auto l : c.get_int_list("ve_layers")) {
      PG_CHECK(l >= 0 && l < m.num_layers, "ve_layers entry {} outside 0..{}", l, m.num_layers - 1);
      m.ve_layers.push_back(static_cast<int>(l));
    }
  }
  m.value_residual = c.get_bool("value_residual");
  m.value_residual_layer0_mix = c.get_bool("value_residual_layer0_mix");
  m.gated_attention = c.get_bool("gated_attention");
  m.gated_attention_bias_init = c.get_double("gated_attention_bias_init");
  m.skip_gates = c.get_bool("skip_gates");
  m.num_loops = static_cast<int>(c.get_int("num_loops"));
  m.loop_start = static_cast<int>(c.get_int("loop_start"));
  m.loop_end = static_cast<int>(c.get_int("loop_end"));
  if (m.num_loops > 0)
    PG_CHECK(0 <= m.loop_start && m.loop_start <= m.loop_end && m.loop_end < m.num_layers,
             "loop range {}..{} outside the {} layers", m.loop_start, m.loop_end, m.num_layers);
  m.parallel_start_layer = static_cast<int>(c.get_int("parallel_start_layer"));
  PG_CHECK(m.parallel_start_layer < m.num_layers, "parallel_start_layer {} >= num_layers {}", m.parallel_start_layer,
           m.num_layers);
  m.param_banks = c.get_bool("param_banks");
  std::string init = c.get_string("init_style");
  if (init == "default") m.init_style = InitStyle::Default;
  else if (init == "ortho") m.init_style = InitStyle::Ortho;
  else if (init == "ortho_banked") m.init_style = InitStyle::OrthoBanked;
  else fail("init_style '{}' is not one of default, ortho, ortho_banked", init);
  m.tied_embed_init_std = c.get_double("tied_embed_init_std");
  return m;
}

bool ModelConfig::ve_on(int layer) const { return ve_index(layer) >= 0; }

int ModelConfig::ve_index(int layer) const {
  if (!ve_enabled) return -1;
  auto it = std::find(ve_layers.begin(), ve_layers.end(), layer);
  return it == ve_layers.end() ? -1 : static_cast<int>(it - ve_layers.begin());
}

double ModelConfig::rope_base_at(int seq_len) const {
  if (rope_ntk_ref_len > 0 && seq_len > rope_ntk_ref_len) {
    double ratio = static_cast<double>(seq_len) / rope_ntk_ref_len;
    return rope_base * std::pow(ratio, static_cast<double>(rope_dims) / (rope_dims - 2));
  }
  return rope_base;
}

ModelConfig::LayerPlan ModelConfig::layer_plan(bool looping) const {
  std::vector<int> order;
  if (looping && num_loops > 0) {
    for (int i = 0; i < loop_start; ++i) order.push_back(i);
    for (int p = 0; p <= num_loops; ++p)
      for (int i = loop_start; i <= loop_end; ++i) order.push_back(i);
    for (int i = loop_end + 1; i < num_layers; ++i) order.push_back(i);
  } else {
    for (int i = 0; i < num_layers; ++i) order.push_back(i);
  }
  LayerPlan plan;
  size_t n_enc = order.size() / 2;
  plan.encoder.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n_enc));
  plan.decoder.assign(order.begin() + static_cast<std::ptrdiff_t>(n_enc), order.end());
  plan.num_skips = static_cast<int>(std::min(plan.encoder.size(), plan.decoder.size()));
  return plan;
}

int ModelConfig::num_skip_params() const { return layer_plan(has_looping()).num_skips; }

std::vector<ParamSpec> param_specs(const ModelConfig& m) {
  std::vector<ParamSpec> out;
  const int64_t d = m.model_dim, L = m.num_layers, H = m.num_heads;
  const int64_t qd = m.q_dim(), kvd = m.kv_dim(), hid = m.mlp_hidden;
  const bool ortho = m.init_style != InitStyle::Default;
  // Block input projections: nn.Linear default, or orthogonal (gain 1) in the ortho stacks.
  const InitKind in_proj = ortho ? InitKind::Orthogonal : InitKind::LinearDefault;
  const double in_proj_v = ortho ? 1.0 : 0.0;
  // bigram.proj / ve_shared.proj: constructed zero, overwritten by the ortho pass with x 1/sqrt(2L)
  // (non-banked stacks) or without the scale (banked stacks); zero in the default stack.
  const double side_scale = m.init_style == InitStyle::Ortho ? 1.0 / std::sqrt(2.0 * L) : 1.0;
  const InitKind side_init = ortho ? InitKind::Orthogonal : InitKind::Zeros;

  auto add = [&](std::string name, Shape s, ParamGroup g, InitKind k, double v = 0.0) {
    out.push_back({std::move(name), std::move(s), g, k, v});
  };
  // The order is the reference scripts' named_parameters() order: the GPT module's own parameters
  // first (banks, skip vectors, lane lambdas), then its submodules in construction order
  // (tok_emb, bigram, smear, blocks, value embedding); inside a block its own parameters come first.
  if (m.param_banks) {
    PG_CHECK(qd == d, "param_banks needs num_heads * head_dim == model_dim (qo_bank holds Q and O as [d, d])");
    // qo_bank: Q slices [0, L) orthogonal, O slices [L, 2L) zero.
    out.push_back({"qo_bank", {2 * L, d, qd}, ParamGroup::Matrix, InitKind::Orthogonal, 1.0, L});
    out.push_back({"kv_bank", {2 * L, kvd, d}, ParamGroup::Matrix, InitKind::Orthogonal, 1.0});
    out.push_back({"mlp_up_bank", {L, hid, d}, ParamGroup::Matrix, InitKind::Orthogonal, 1.0});
    out.push_back({"mlp_down_bank", {L, d, hid}, ParamGroup::Matrix, InitKind::Zeros, 0.0});
  }
  const int64_t n_skip = m.num_skip_params();
  if (n_skip > 0) add("skip_weights", {n_skip, d}, ParamGroup::Scalar, InitKind::Ones);
  if (m.skip_gates && n_skip > 0) add("skip_gates", {n_skip, d}, ParamGroup::Scalar, InitKind::Zeros);
  if (m.parallel_start_layer >= 0) {
    add("parallel_post_lambdas", {L, 2, 2}, ParamGroup::Scalar, InitKind::Ones);
    add("parallel_resid_lambdas", {L, 2}, ParamGroup::Scalar, InitKind::Constant, 1.1);
  }
  add("tok_emb.weight", {m.vocab_size, d}, ParamGroup::Embed, InitKind::Normal, m.tied_embed_init_std);
  if (m.bigram_vocab_size > 0) {
    add("bigram.scale", {}, ParamGroup::Scalar, InitKind::Constant, 0.05);
    add("bigram.embed.weight", {m.bigram_vocab_size, m.bigram_dim}, ParamGroup::Embed, InitKind::Zeros);
    add("bigram.proj.weight", {d, m.bigram_dim}, ParamGroup::Matrix, side_init, side_scale);
  }
  // s600's direct table is an nn.Embedding with its default N(0, 1) init.
  if (m.bigram_direct_size > 0)
    add("bigram_emb.weight", {m.bigram_direct_size, d}, ParamGroup::Embed, InitKind::Normal, 1.0);
  if (m.smear_gate) add("smear.gate", {d}, ParamGroup::Scalar, InitKind::Zeros);
  for (int64_t i = 0; i < L; ++i) {
    std::string b = "blocks." + std::to_string(i) + ".";
    add(b + "attn_scale", {d}, ParamGroup::Scalar, InitKind::Ones);
    add(b + "mlp_scale", {d}, ParamGroup::Scalar, InitKind::Ones);
    add(b + "resid_mix", {2, d}, ParamGroup::Scalar, InitKind::ResidMix);
    if (m.branch_gates) {
      add(b + "attn_gate", {d}, ParamGroup::Scalar, InitKind::Zeros);
      add(b + "mlp_gate", {d}, ParamGroup::Scalar, InitKind::Zeros);
    }
    add(b + "attn.q_gain", {H}, ParamGroup::Scalar, InitKind::Constant, m.qk_gain_init);
    if (m.value_residual) add(b + "attn.vr_lambda", {2}, ParamGroup::Scalar, InitKind::Constant, 0.5);
    if (!m.param_banks) {
      add(b + "attn.c_q.weight", {qd, d}, ParamGroup::Matrix, in_proj, in_proj_v);
      add(b + "attn.c_k.weight", {kvd, d}, ParamGroup::Matrix, in_proj, in_proj_v);
      add(b + "attn.c_v.weight", {kvd, d}, ParamGroup::Matrix, in_proj, in_proj_v);
      add(b + "attn.proj.weight", {d, qd}, ParamGroup::Matrix, InitKind::Zeros);
    }
    if (m.gated_attention) {
      add(b + "attn.attn_gate.weight", {H, d}, ParamGroup::Matrix, InitKind::Zeros);
      add(b + "attn.attn_gate.bias", {H}, ParamGroup::Scalar, InitKind::Constant, m.gated_attention_bias_init);
    }
    if (!m.param_banks) {
      add(b + "mlp.fc.weight", {hid, d}, ParamGroup::Matrix, in_proj, in_proj_v);
      add(b + "mlp.proj.weight", {d, hid}, ParamGroup::Matrix, InitKind::Zeros);
    }
  }
  if (m.ve_enabled) {
    add("ve_shared.scale", {}, ParamGroup::Scalar, InitKind::Constant, 0.1);
    add("ve_shared.embed.weight", {m.vocab_size, m.ve_dim}, ParamGroup::Embed, InitKind::Normal, 0.01);
    add("ve_shared.proj.weight", {kvd, m.ve_dim}, ParamGroup::Matrix, side_init, side_scale);
    for (size_t i = 0; i < m.ve_layers.size(); ++i)
      add("ve_layer_scales." + std::to_string(i), {1}, ParamGroup::Scalar, InitKind::Ones);
  }
  return out;
}

int64_t param_count(const ModelConfig& m) {
  int64_t n = 0;
  for (auto& p : param_specs(m)) n += p.numel();
  return n;
}

}  // namespace pgolf
