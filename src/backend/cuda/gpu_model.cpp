// GpuModel: construction (offsets, bf16 weight copies, the activation arena), modes, the batch
// upload, the embedding and the head, and the walk over the layer plan. The blocks are in
// gpu_layer.cpp. Shapes: N tokens, d = model_dim, V = vocab; activations bf16 [N, ·], running
// gradients fp32 [N, d].
#include "backend/cuda/gpu_model.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/rope.h"
#include "backend/cuda/attention_reference.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/embedding.h"
#include "backend/cuda/gpu_model_impl.h"
#include "backend/cuda/head_gate.h"
#include "backend/cuda/lora.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/ngram_hash.h"
#include "backend/cuda/qk_norm_rope.h"
#include "backend/cuda/residual.h"
#include "backend/cuda/rmsnorm.h"
#include "backend/cuda/smear.h"
#include "backend/cuda/softcap_ce.h"
#include "backend/cuda/value.h"
#include "core/error.h"
#include "core/half.h"

namespace pgolf::cuda {

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Two passes over the same allocation list: one to size the arena, one to carve it.
struct CountingAlloc {
  size_t bytes = 0;
  template <typename T>
  T* get(int64_t count, const char*) {
    bytes += static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(T)), 256));
    return nullptr;
  }
};
struct ArenaAlloc {
  Arena* arena;
  template <typename T>
  T* get(int64_t count, const char* name) {
    return count > 0 ? arena->allocate<T>(static_cast<size_t>(count), name) : nullptr;
  }
};

}  // namespace

// ---- construction -------------------------------------------------------------------------------

int64_t GpuModel::Impl::offset(const std::string& name) const { return layout.offset(layout.index_of(name)); }
int64_t GpuModel::Impl::offset_if(const std::string& name) const { return layout.has(name) ? offset(name) : -1; }

GpuModel::Impl::Impl(const ModelConfig& config, const GpuModelOptions& options)
    : cfg(config), layout(param_specs(config)), max_tokens(options.max_tokens), deterministic(options.deterministic),
      attention(options.attention) {
  attention.deterministic = deterministic;
  // The deterministic path runs the mma.sync backward, whose shapes are 4 and 8 warps (not the
  // wgmma kernel's default 12): it keeps the 4 it has always had.
  if (deterministic && attention.backward_warps == 12) attention.backward_warps = 4;
  const ModelConfig& m = cfg;
  d = m.model_dim, qd = m.q_dim(), kvd = m.kv_dim(), hid = m.mlp_hidden, V = m.vocab_size;
  H = m.num_heads, Hkv = m.num_kv_heads, Dh = m.head_dim;
  qkv_w = qd + 2 * kvd;
  mlp_fused = options.mlp_fused && mlp_fused_supported(d, hid);
  qkv_fused = options.qkv_product != QkvProduct::separate &&
              qkv_fused_supported(d, QkShape{0, 1, H, Hkv, Dh, m.rope_dims});
  qkv_fused_everywhere = options.qkv_product == QkvProduct::fused;
  fold_dq_finish = options.fold_dq_finish && Dh == kAttentionHeadDim && !deterministic;
  bf16_norm_grads = options.bf16_norm_grads;
  lora_side_stream = options.lora_side_stream;
  gate_ld = static_cast<int>(round_up(H, 8));
  PG_CHECK(max_tokens > 0, "GpuModel: max_tokens must be positive, got {}", max_tokens);
  PG_CHECK(!(m.branch_gates && m.parallel_start_layer > 0),
           "branch_gates (s600) and parallel lanes (s1560) are not combined by any reference");
  for (auto [what, value] : {std::pair<const char*, int>{"model_dim", d}, {"q_dim", qd}, {"kv_dim", kvd},
                             {"mlp_hidden", hid}, {"vocab_size", V}, {"head_dim", Dh}})
    PG_CHECK(value % 8 == 0, "GpuModel: {} = {} must be a multiple of 8 (16-byte rows)", what, value);
  PG_CHECK(d <= 1024, "GpuModel: model_dim {} is above the row kernels' 1024", d);
  PG_CHECK(Dh <= 64 && 64 % H == 0, "GpuModel: head_dim {} must be at most 64 and num_heads {} divide 64", Dh, H);
  PG_CHECK(!deterministic || Dh == kAttentionHeadDim,
           "GpuModel: deterministic mode needs the flash attention kernels (head_dim 64, not {}): the reference "
           "attention's backward sums with atomics",
           Dh);
  if (m.bigram_vocab_size > 0)
    PG_CHECK(m.bigram_dim % 8 == 0, "GpuModel: bigram_dim {} must be a multiple of 8", m.bigram_dim);
  if (m.ve_enabled) PG_CHECK(m.ve_dim % 8 == 0, "GpuModel: ve_dim {} must be a multiple of 8", m.ve_dim);
  PG_CUDA_CHECK(cudaStreamCreate(&stream));

  params = DeviceBuffer<float>(static_cast<size_t>(layout.total()), "parameters");
  grads = DeviceBuffer<float>(static_cast<size_t>(layout.total()), "gradients");
  grads.fill_bytes(0);

  gp.tok_emb = offset("tok_emb.weight");
  gp.bigram_embed = offset_if("bigram.embed.weight");
  gp.bigram_proj = offset_if("bigram.proj.weight");
  gp.bigram_scale = offset_if("bigram.scale");
  gp.bigram_direct = offset_if("bigram_emb.weight");
  gp.smear_gate = offset_if("smear.gate");
  gp.ve_embed = offset_if("ve_shared.embed.weight");
  gp.ve_proj = offset_if("ve_shared.proj.weight");
  gp.ve_scale = offset_if("ve_shared.scale");
  gp.skip_weights = offset_if("skip_weights");
  gp.skip_gates = offset_if("skip_gates");
  const int64_t L = m.num_layers;
  const int64_t par_resid = offset_if("parallel_resid_lambdas"), par_post = offset_if("parallel_post_lambdas");
  lp.resize(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    LayerParams& p = lp[static_cast<size_t>(i)];
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
    }
    p.qkv_contiguous = p.wk == p.wq + int64_t{qd} * d && p.wv == p.wk + int64_t{kvd} * d;
    if (par_resid >= 0) {
      p.par_resid = par_resid + 2 * i;
      p.par_post = par_post + 4 * i;
    }
    p.ln_scale = m.ln_scale ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(i + 1))) : 1.f;
    p.xsa = m.xsa_on(static_cast<int>(i));
  }
  build_weight_copies();

  max_virtual = static_cast<int>(cfg.layer_plan(false).encoder.size() + cfg.layer_plan(false).decoder.size());
  if (cfg.has_looping()) {
    const auto looped = cfg.layer_plan(true);
    max_virtual = std::max(max_virtual, static_cast<int>(looped.encoder.size() + looped.decoder.size()));
  }
  build_plan();

  CountingAlloc counter;
  allocate(counter);
  arena = std::make_unique<Arena>(counter.bytes + 4096);
  ArenaAlloc carver{arena.get()};
  allocate(carver);

  // ids, targets, cu (N + 65), the selection's index and targets, query_begin (N + 65), weights and
  // the selected rows' weights.
  const size_t staging_ints = static_cast<size_t>(6 * max_tokens + 130);
  void* host = nullptr;
  PG_CUDA_CHECK(cudaMallocHost(&host, staging_ints * 4 + static_cast<size_t>(2 * max_tokens) * 4));
  staging.ids = static_cast<int32_t*>(host);
  staging.targets = staging.ids + max_tokens;
  staging.cu = staging.targets + max_tokens;
  staging.selected = staging.cu + max_tokens + 65;
  staging.selected_targets = staging.selected + max_tokens;
  staging.query_begin = staging.selected_targets + max_tokens;
  staging.weights = reinterpret_cast<float*>(staging.query_begin + max_tokens + 65);
  staging.selected_weights = staging.weights + max_tokens;
  PG_CUDA_CHECK(cudaEventCreateWithFlags(&staging.free, cudaEventDisableTiming));
  PG_CUDA_CHECK(cudaEventCreateWithFlags(&staging.weights_free, cudaEventDisableTiming));
}

GpuModel::Impl::~Impl() {
  if (side.fork) cudaEventDestroy(side.fork);
  if (side.join) cudaEventDestroy(side.join);
  if (side.stream) cudaStreamDestroy(side.stream);
  if (staging.free) cudaEventDestroy(staging.free);
  if (staging.weights_free) cudaEventDestroy(staging.weights_free);
  if (staging.ids) cudaFreeHost(staging.ids);
  if (stream) cudaStreamDestroy(stream);
}

// The bf16 copies: per physical layer [Wq; Wk; Wv], Wo, Wfc, Wproj (late-QAT matrices unless banked)
// and the gate weight; then the tables and the side projections. Groups start on 256-byte boundaries.
void GpuModel::Impl::build_weight_copies() {
  std::vector<WeightCopy> table;
  int64_t dst = 0, rows = 0;
  auto add = [&](int64_t src, int r, int c, bool quantize) {
    const int64_t at = dst;
    table.push_back(WeightCopy{src, dst, rows, r, c, quantize});
    dst += int64_t{r} * c;
    rows += r;
    has_qat_matrices = has_qat_matrices || quantize;
    return at;
  };
  auto align = [&] { dst = round_up(dst, 128); };
  const bool casted = !cfg.param_banks;  // banks are not CastedLinear: no late QAT on them
  for (LayerParams& p : lp) {
    p.w16_qkv = add(p.wq, qd, d, casted);
    add(p.wk, kvd, d, casted);
    add(p.wv, kvd, d, casted);
    align();
    p.w16_o = add(p.wo, d, qd, casted);
    align();
    p.w16_fc = add(p.wfc, hid, d, casted);
    align();
    p.w16_proj = add(p.wproj, d, hid, casted);
    align();
    if (p.gate_w >= 0) {
      p.w16_gate = add(p.gate_w, H, d, false);  // nn.Linear, not CastedLinear
      align();
    }
  }
  gp.w16_tok_emb = add(gp.tok_emb, V, d, false);
  align();
  if (gp.bigram_embed >= 0) {
    gp.w16_bigram_embed = add(gp.bigram_embed, cfg.bigram_vocab_size, cfg.bigram_dim, false);
    align();
    gp.w16_bigram_proj = add(gp.bigram_proj, d, cfg.bigram_dim, true);
    align();
  }
  if (gp.bigram_direct >= 0) {
    gp.w16_bigram_direct = add(gp.bigram_direct, cfg.bigram_direct_size, d, false);
    align();
  }
  if (gp.ve_embed >= 0) {
    gp.w16_ve_embed = add(gp.ve_embed, V, cfg.ve_dim, false);
    align();
    gp.w16_ve_proj = add(gp.ve_proj, kvd, cfg.ve_dim, true);
    align();
  }
  w16 = DeviceBuffer<bf16>(static_cast<size_t>(dst), "bf16 weight copies");
  copies = DeviceBuffer<WeightCopy>(table, "weight copy table");
  n_copies = static_cast<int>(table.size());
  copy_rows = rows;
}

void GpuModel::Impl::build_plan() {
  plan = cfg.layer_plan(looping);
  std::vector<int> phys = plan.encoder;
  phys.insert(phys.end(), plan.decoder.begin(), plan.decoder.end());
  const int E = static_cast<int>(plan.encoder.size());
  order.assign(phys.size(), VirtualLayer{});
  bool seen_parallel = false;
  for (int v = 0; v < static_cast<int>(phys.size()); ++v) {
    VirtualLayer& L = order[static_cast<size_t>(v)];
    L.physical = phys[static_cast<size_t>(v)];
    const bool enc = v < E;
    L.parallel = !enc && cfg.parallel_on(L.physical);
    PG_CHECK(enc || L.parallel || !seen_parallel,
             "layer plan: decoder layer {} is not parallel but follows a parallel one", L.physical);
    L.opens_lanes = L.parallel && !seen_parallel;
    seen_parallel = seen_parallel || L.parallel;
    L.skip = !enc && v - E < plan.num_skips ? v - E : -1;
  }
}

size_t GpuModel::Impl::reduce_floats() const {
  const int64_t n = max_tokens;
  size_t floats = residual_workspace_floats(n, d);
  floats = std::max(floats, qk_norm_rope_workspace_floats(QkShape{n, 1, H, Hkv, Dh, cfg.rope_dims}));
  floats = std::max(floats, value_workspace_floats(ValueShape{n, kvd}));
  floats = std::max(floats, head_gate_workspace_floats(HeadGateShape{n, H, Dh, gate_ld}));
  floats = std::max(floats, static_cast<size_t>(elementwise_blocks(n * std::max(d, kvd))));
  return floats;
}

template <typename Alloc>
void GpuModel::Impl::allocate(Alloc& a) {
  const ModelConfig& m = cfg;
  const int64_t n = max_tokens;
  const bool any_xsa = m.xsa_last_n > 0, gated = m.gated_attention, lanes = m.parallel_start_layer > 0;
  const bool ve = m.ve_enabled && !m.ve_layers.empty();
  io.ids = a.template get<int32_t>(n, "ids");
  io.targets = a.template get<int32_t>(n, "targets");
  io.cu = a.template get<int32_t>(n + 65, "cu_seqlens");
  if (m.bigram_vocab_size > 0) {
    io.bigram_idx = a.template get<int32_t>(n, "bigram indices");
    if (m.trigram_hash) io.trigram_idx = a.template get<int32_t>(n, "trigram indices");
    io.bigram_h = a.template get<bf16>(n * m.bigram_dim, "bigram rows");
    io.bigram_p = a.template get<bf16>(n * d, "bigram projection");
  }
  if (m.bigram_direct_size > 0) io.direct_idx = a.template get<int32_t>(n, "direct bigram indices");
  io.e = a.template get<bf16>(n * d, "embedding sum");
  io.x_norm = a.template get<bf16>(n * d, "embedding norm");
  io.x0 = m.smear_gate ? a.template get<bf16>(n * d, "x0") : io.x_norm;
  io.e_rstd = a.template get<float>(n, "embedding rstd");
  if (ve) {
    io.ve_h = a.template get<bf16>(n * m.ve_dim, "value embedding rows");
    io.ve_p = a.template get<bf16>(n * kvd, "value embedding projection");
    io.ve = a.template get<bf16>(n * kvd, "value embedding");
  }
  io.h = a.template get<bf16>(n * d, "final norm");
  io.final_rstd = a.template get<float>(n, "final rstd");
  io.logits = a.template get<bf16>(n * V, "logits");
  io.losses = a.template get<float>(n, "losses");
  io.lse = a.template get<float>(n, "loss lse");
  io.loss = a.template get<float>(8, "mean loss");
  io.weights = a.template get<float>(n, "token weights");
  if (Dh == kAttentionHeadDim) {  // the selective forward needs the flash kernels' query_begin
    selection.index = a.template get<int32_t>(n, "selected rows");
    selection.targets = a.template get<int32_t>(n, "selected targets");
    selection.query_begin = a.template get<int32_t>(n + 65, "selected query starts");
    selection.losses = a.template get<float>(n, "selected losses");
    selection.weights = a.template get<float>(n, "selected token weights");
    selection.y = a.template get<bf16>(n * qd, "selected attention output");
    if (any_xsa) selection.vals = a.template get<bf16>(n * kvd, "selected values");
    if (gated) selection.n = a.template get<bf16>(n * d, "selected attention norm");
    selection.x_in = a.template get<bf16>(n * d, "selected x_in");
    if (lanes) {
      selection.x = a.template get<bf16>(n * d, "selected lane 0");
      selection.lane1 = a.template get<bf16>(n * d, "selected lane 1");
    }
  }

  layers.assign(static_cast<size_t>(max_virtual), LayerBuf{});
  for (LayerBuf& b : layers) {
    b.in = a.template get<bf16>(n * d, "layer input");
    b.x_in = a.template get<bf16>(n * d, "x_in");
    b.n = a.template get<bf16>(n * d, "attention norm");
    b.n_rstd = a.template get<float>(n, "attention rstd");
    b.qkv = a.template get<bf16>(n * qkv_w, "qkv");
    b.q = a.template get<bf16>(n * qd, "q");
    b.k = a.template get<bf16>(n * kvd, "k");
    b.v_raw = a.template get<bf16>(n * kvd, "v_raw");
    if (m.value_residual) b.v = a.template get<bf16>(n * kvd, "v mixed");
    b.q_rstd = a.template get<float>(n * H, "q rstd");
    b.k_rstd = a.template get<float>(n * Hkv, "k rstd");
    b.y = a.template get<bf16>(n * qd, "attention output");
    b.lse = a.template get<float>(n * H, "attention lse");
    if (any_xsa) b.y_xsa = a.template get<bf16>(n * qd, "xsa output");
    if (gated) {
      b.gate_logits = a.template get<float>(n * gate_ld, "gate logits");
      b.gate = a.template get<float>(n * H, "gate");
      b.y_gated = a.template get<bf16>(n * qd, "gated output");
    }
    b.a = a.template get<bf16>(n * d, "attention branch");
    b.x_mid = a.template get<bf16>(n * d, "x_mid");
    b.m = a.template get<bf16>(n * d, "mlp norm");
    b.m_rstd = a.template get<float>(n, "mlp rstd");
    b.pre = a.template get<bf16>(n * hid, "mlp pre");
    b.post = a.template get<bf16>(n * hid, "mlp post");
    b.f = a.template get<bf16>(n * d, "mlp branch");
    b.out = a.template get<bf16>(n * d, "layer output");
    if (lanes) b.out1 = a.template get<bf16>(n * d, "lane 1 output");
  }

  bw.g = a.template get<float>(n * d, "grad stream");
  if (lanes) bw.g1 = a.template get<float>(n * d, "grad lane 1");
  bw.dn = a.template get<float>(n * d, "grad attention norm");
  bw.dm = a.template get<float>(n * d, "grad mlp norm");
  bw.dx0 = a.template get<float>(n * d, "grad x0");
  if (ve) bw.dve = a.template get<float>(n * kvd, "grad value embedding");
  if (m.value_residual) bw.dv0 = a.template get<float>(n * kvd, "grad v0");
  if (any_xsa) bw.dv_xsa = a.template get<float>(n * kvd, "grad v (xsa)");
  bw.da = a.template get<bf16>(n * d, "grad attention branch");
  bw.df = a.template get<bf16>(n * d, "grad mlp branch");
  bw.dy = a.template get<bf16>(n * qd, "grad attention output");
  bw.dy2 = a.template get<bf16>(n * qd, "grad attention output 2");
  // With the dQ fold, qk_norm_rope_backward reads the attention backward's fp32 sum (its workspace) instead.
  if (!fold_dq_finish) bw.dq = a.template get<bf16>(n * qd, "grad q");
  bw.dk = a.template get<bf16>(n * kvd, "grad k");
  bw.dv = a.template get<bf16>(n * kvd, "grad v");
  bw.dqkv = a.template get<bf16>(n * qkv_w, "grad qkv");
  bw.dpost = a.template get<bf16>(n * hid, "grad mlp hidden");
  if (gated) bw.dgate_logits = a.template get<bf16>(n * gate_ld, "grad gate logits");
  if (m.bigram_vocab_size > 0) bw.dbigram_h = a.template get<float>(n * m.bigram_dim, "grad bigram rows");
  if (ve) {
    bw.dve_h = a.template get<float>(n * m.ve_dim, "grad value embedding rows");
    bw.dve_p = a.template get<bf16>(n * kvd, "grad value embedding projection");
  }
  bw.d_enc.assign(static_cast<size_t>(m.num_skip_params()), nullptr);
  for (float*& p : bw.d_enc) p = a.template get<float>(n * d, "grad skip");
  AttentionShape shape;
  shape.total_tokens = static_cast<int>(n), shape.num_heads = H, shape.num_kv_heads = Hkv;
  bw.attn_ws_bytes = Dh == kAttentionHeadDim ? attention_backward_workspace_bytes(shape)
                                              : attention_reference_workspace_bytes(shape, Dh);
  bw.attn_ws = a.template get<unsigned char>(static_cast<int64_t>(bw.attn_ws_bytes), "attention workspace");
  if (deterministic) {
    bw.sort_ws_bytes = embedding_sort_workspace_bytes(n);
    bw.sort_ws = a.template get<unsigned char>(static_cast<int64_t>(bw.sort_ws_bytes), "embedding sort workspace");
  }
  bw.reduce.floats = reduce_floats();
  bw.reduce.data = a.template get<float>(static_cast<int64_t>(bw.reduce.floats), "reduction workspace");
}

// ---- helpers ------------------------------------------------------------------------------------

void GpuModel::Impl::linear(const bf16* x, int64_t ld_x, const bf16* w, int rows, int in, int out, void* y,
                            int64_t ld_y, bool f32_out, float beta) {
  GemmShape s;
  s.m = rows, s.n = out, s.k = in, s.trans_b = true;
  s.output = f32_out ? GemmOutput::kF32 : GemmOutput::kBf16;
  s.lda = ld_x == in ? 0 : ld_x;
  s.ldd = ld_y == out ? 0 : ld_y;
  gemm.run(s, x, w, y, 1.f, beta, stream);
}

void GpuModel::Impl::linear_dx(const bf16* dy, int64_t ld_dy, const bf16* w, int rows, int in, int out, void* dx,
                               bool f32_out, float beta) {
  GemmShape s;
  s.m = rows, s.n = in, s.k = out;
  s.output = f32_out ? GemmOutput::kF32 : GemmOutput::kBf16;
  s.lda = ld_dy == out ? 0 : ld_dy;
  gemm.run(s, dy, w, dx, 1.f, beta, stream);
}

NormGrad GpuModel::Impl::norm_grad_dx(const bf16* dy, int64_t ld_dy, const bf16* w, int rows, int in, int out,
                                       float* storage, bool sole) {
  if (!sole || !bf16_norm_grads) {
    linear_dx(dy, ld_dy, w, rows, in, out, storage, true, 0.f);
    return storage;
  }
  bf16* rows16 = reinterpret_cast<bf16*>(storage);  // the first half of the fp32 buffer
  linear_dx(dy, ld_dy, w, rows, in, out, rows16, false, 0.f);
  return rows16;
}

void GpuModel::Impl::linear_dw(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x, int rows, int in, int out,
                               float* dw) {
  if (!dw) return;
  GemmShape s;
  s.m = out, s.n = in, s.k = rows, s.trans_a = true, s.output = GemmOutput::kF32;
  s.lda = ld_dy == out ? 0 : ld_dy;
  s.ldb = ld_x == in ? 0 : ld_x;
  gemm.run(s, dy, x, dw, 1.f, 1.f, stream);
}

namespace {

// The products' shape for adapter `ad` over `rows` rows of `seq_len` tokens: its own rank, or with
// `whole_group` its group's (rank group_size·r over the group's A block).
LoraGemmShape lora_shape(const LoraAdapterLayout& ad, int rank, int64_t rows, int64_t seq_len, int64_t y_ld,
                         bool whole_group) {
  LoraGemmShape s;
  s.rows = static_cast<int>(rows), s.seq_len = static_cast<int>(seq_len);
  s.in = static_cast<int>(ad.in), s.out = static_cast<int>(ad.out);
  s.rank = whole_group ? ad.group_size * rank : rank;
  s.x_ld = ad.in, s.y_ld = y_ld;
  s.a_stride = ad.a_stride;
  s.h_ld = int64_t{ad.group_size} * rank;
  return s;
}

}  // namespace

void GpuModel::Impl::lora_forward(LoraTarget target, int slot, const bf16* x, bf16* y, int64_t y_ld,
                                  int64_t row_tokens) {
  if (!lora) return;
  GpuLora::Impl& l = lora->impl();
  const LoraAdapterLayout* ad = l.find(target, slot);
  if (!ad) return;
  const LoraGemmShape s =
      lora_shape(*ad, l.config.rank, B, row_tokens > 0 ? row_tokens : T, y_ld, /*whole_group=*/false);
  const bf16* A = l.params16.data() + ad->a_offset;
  const bf16* B16 = l.params16.data() + ad->b_offset;
  if (ad->group_size > 1) {
    PG_CHECK(x == l.group_input[static_cast<size_t>(slot)] && row_tokens <= 0,
             "GpuModel: a grouped LoRA adapter of layer {} applied to another input than its group's", slot);
    cuda::lora_apply(gemm, l.hidden_of(target, slot), B16, y, s, stream);
  } else {
    cuda::lora_forward(gemm, x, A, B16, l.hidden_of(target, slot), y, s, stream);
  }
}

void GpuModel::Impl::lora_group_hidden(int slot, const bf16* x) {
  if (!lora) return;
  GpuLora::Impl& l = lora->impl();
  const LoraAdapterLayout* lead = l.group_lead(slot);
  if (!lead) return;
  const LoraGemmShape s = lora_shape(*lead, l.config.rank, B, T, 0, /*whole_group=*/true);
  cuda::lora_hidden(gemm, x, l.params16.data() + lead->a_offset, l.hidden_at(lead), s, stream);  // member 0's h: the group's
  l.group_input[static_cast<size_t>(slot)] = x;
}

void GpuModel::Impl::side_fork() {
  PG_CUDA_CHECK(cudaEventRecord(side.fork, stream));
  PG_CUDA_CHECK(cudaStreamWaitEvent(side.stream, side.fork, 0));
  side.open = true;
}

void GpuModel::Impl::side_join() {
  if (!side.open) return;
  PG_CUDA_CHECK(cudaEventRecord(side.join, side.stream));
  PG_CUDA_CHECK(cudaStreamWaitEvent(stream, side.join, 0));
  side.open = false;
}

void GpuModel::Impl::lora_backward(LoraTarget target, int slot, const bf16* dy, int64_t dy_ld, const bf16* x,
                                   float* dx, int64_t row_tokens) {
  if (!lora) return;
  GpuLora::Impl& l = lora->impl();
  const LoraAdapterLayout* ad = l.find(target, slot);
  if (!ad) return;
  LoraGemmShape s = lora_shape(*ad, l.config.rank, B, row_tokens > 0 ? row_tokens : T, dy_ld, /*whole_group=*/false);
  s.accumulate = !l.overwrite_grads;
  const bf16* A = l.params16.data() + ad->a_offset;
  const bf16* B16 = l.params16.data() + ad->b_offset;
  const bf16* h = l.hidden_of(target, slot);
  float* dA = l.grads.data() + ad->a_offset;
  float* dB = l.grads.data() + ad->b_offset;
  const bool side_grads = side_ready();
  if (side_grads) {  // dB on the side once dy is there; the dh and dx products stay on the stream
    side_fork();
    cuda::lora_grad_b(*side.gemm, dy, h, dB, s, side.stream);
  }
  if (ad->group_size > 1) {  // d h into the group's scratch columns; lora_group_backward does the rest
    PG_CHECK(x == l.group_input[static_cast<size_t>(slot)] && row_tokens <= 0,
             "GpuModel: a grouped LoRA adapter of layer {} differentiated at another input than its group's", slot);
    cuda::lora_backward_out(gemm, dy, B16, h, l.dh.data() + ad->group_index * l.config.rank, side_grads ? nullptr : dB,
                            s, stream);
    return;
  }
  cuda::lora_backward_out(gemm, dy, B16, h, l.dh.data(), side_grads ? nullptr : dB, s, stream);
  if (side_grads) {  // dA once dh is there
    side_fork();
    cuda::lora_grad_a(*side.gemm, l.dh.data(), x, dA, s, side.stream);
  }
  cuda::lora_backward_in(gemm, l.dh.data(), x, A, side_grads ? nullptr : dA, dx, s, stream);
}

void GpuModel::Impl::lora_group_backward(int slot, const bf16* x, float* dx) {
  if (!lora) return;
  GpuLora::Impl& l = lora->impl();
  const LoraAdapterLayout* lead = l.group_lead(slot);
  if (!lead) return;
  PG_CHECK(x == l.group_input[static_cast<size_t>(slot)],
           "GpuModel: the LoRA group of layer {} differentiated at another input than its forward's", slot);
  LoraGemmShape s = lora_shape(*lead, l.config.rank, B, T, 0, /*whole_group=*/true);
  s.accumulate = !l.overwrite_grads;
  float* dA = l.grads.data() + lead->a_offset;
  const bool side_grads = side_ready();
  if (side_grads) {  // the group's dA once every member's dh is there
    side_fork();
    cuda::lora_grad_a(*side.gemm, l.dh.data(), x, dA, s, side.stream);
  }
  cuda::lora_backward_in(gemm, l.dh.data(), x, l.params16.data() + lead->a_offset, side_grads ? nullptr : dA, dx, s,
                         stream);
}

void GpuModel::Impl::embedding_grad(const int32_t* ids, const float* dout, int dim, float* dtable, int table_rows) {
  if (!dtable) return;
  if (deterministic)
    embedding_backward_sorted(ids, N, dout, dim, dtable, table_rows, bw.sort_ws, bw.sort_ws_bytes, stream);
  else
    embedding_backward(ids, N, dout, dim, dtable, stream);
}

AttentionShape GpuModel::Impl::attention_shape() const {
  AttentionShape s;
  s.total_tokens = static_cast<int>(N), s.num_heads = H, s.num_kv_heads = Hkv;
  s.cu_seqlens = io.cu, s.num_segments = num_segments;
  return s;
}

std::vector<float> GpuModel::Impl::download_bf16(const bf16* p, int64_t n) const {
  std::vector<uint16_t> bits(static_cast<size_t>(n));
  PG_CUDA_CHECK(cudaMemcpyAsync(bits.data(), p, static_cast<size_t>(n) * 2, cudaMemcpyDeviceToHost, stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_bits_to_f32(bits[i]);
  return out;
}

// ---- the batch ---------------------------------------------------------------------------------

void GpuModel::Impl::set_batch(const Batch& batch) {
  batch.validate(V);
  PG_CHECK(batch.tokens() <= max_tokens, "GpuModel: the batch has {} tokens, the model was sized for {}",
           batch.tokens(), max_tokens);
  const std::vector<int32_t> cu = batch.segments();
  PG_CHECK(static_cast<int64_t>(cu.size()) <= batch.tokens() + 65,
           "GpuModel: {} cu_seqlens entries for {} tokens (at most tokens + 65 are expected)", cu.size(),
           batch.tokens());
  B = batch.rows, T = batch.seq_len, N = batch.tokens();
  num_segments = static_cast<int>(cu.size()) - 1;
  max_seqlen = 1;
  for (size_t s = 0; s + 1 < cu.size(); ++s) max_seqlen = std::max(max_seqlen, cu[s + 1] - cu[s]);
  has_targets = !batch.targets.empty();
  // Through the pinned staging (free again once the previous upload has left it): asynchronous copies,
  // no wait for the stream, so the upload overlaps the work queued before it.
  PG_CUDA_CHECK(cudaEventSynchronize(staging.free));
  std::copy(batch.inputs.begin(), batch.inputs.end(), staging.ids);
  std::copy(batch.targets.begin(), batch.targets.end(), staging.targets);
  std::copy(cu.begin(), cu.end(), staging.cu);
  PG_CUDA_CHECK(cudaMemcpyAsync(io.ids, staging.ids, static_cast<size_t>(N) * 4, cudaMemcpyHostToDevice, stream));
  if (has_targets)
    PG_CUDA_CHECK(cudaMemcpyAsync(io.targets, staging.targets, static_cast<size_t>(N) * 4, cudaMemcpyHostToDevice,
                                  stream));
  PG_CUDA_CHECK(cudaMemcpyAsync(io.cu, staging.cu, cu.size() * 4, cudaMemcpyHostToDevice, stream));
  upload_selection(batch, cu);
  PG_CUDA_CHECK(cudaEventRecord(staging.free, stream));
  auto it = rope_tables.find(T);
  if (it == rope_tables.end()) {
    const cpu::RopeTable t = cpu::make_rope_table(cfg.rope_base_at(static_cast<int>(T)), cfg.rope_dims,
                                                  static_cast<int>(T));
    it = rope_tables.emplace(T, std::make_pair(DeviceBuffer<float>(t.cos, "rope cos"), DeviceBuffer<float>(t.sin, "rope sin")))
             .first;
  }
  rope_cos = it->second.first.data();
  rope_sin = it->second.second.data();
  batch_set = true;
  forward_done = false;
}

// Batch::losses_from → the selected rows (token indices, increasing), their targets and the per-segment
// first selected query (segment-local; segments lie within rows). Requested only when it leaves out
// some but not all positions. Runs inside set_batch, on its staging.
void GpuModel::Impl::upload_selection(const Batch& batch, const std::vector<int32_t>& cu) {
  selection.requested = false;
  selection.rows = 0;
  selection.tail = 0;
  if (batch.losses_from.empty() || !has_targets || !selection.index) return;
  int64_t M = 0;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = batch.losses_from[static_cast<size_t>(r)]; t < T; ++t) {
      staging.selected[M] = static_cast<int32_t>(r * T + t);
      staging.selected_targets[M++] = batch.targets[static_cast<size_t>(r * T + t)];
    }
  if (M == 0 || M == N) return;
  for (int s = 0; s < num_segments; ++s) {
    const int32_t row = std::min<int32_t>(cu[s] / static_cast<int32_t>(T), static_cast<int32_t>(B - 1));
    const int32_t first = row * static_cast<int32_t>(T) + batch.losses_from[static_cast<size_t>(row)];
    staging.query_begin[s] = std::max(0, first - cu[s]);
  }
  selection.requested = true;
  selection.rows = M;
  if (std::all_of(batch.losses_from.begin(), batch.losses_from.end(),
                  [&](int32_t t) { return t == batch.losses_from.front(); }))
    selection.tail = T - batch.losses_from.front();
  PG_CUDA_CHECK(cudaMemcpyAsync(selection.index, staging.selected, static_cast<size_t>(M) * 4, cudaMemcpyHostToDevice,
                                stream));
  PG_CUDA_CHECK(cudaMemcpyAsync(selection.targets, staging.selected_targets, static_cast<size_t>(M) * 4,
                                cudaMemcpyHostToDevice, stream));
  PG_CUDA_CHECK(cudaMemcpyAsync(selection.query_begin, staging.query_begin, static_cast<size_t>(num_segments) * 4,
                                cudaMemcpyHostToDevice, stream));
}

bool GpuModel::Impl::runs_selected_rows() const { return selection.requested && !train && !lora; }
bool GpuModel::Impl::selects_head_rows() const { return selection.requested && !train && lora && selection.tail > 0; }

void GpuModel::Impl::upload_token_weights(std::span<const float> weights) {
  PG_CHECK(head_grad == HeadGrad::None,
           "GpuModel: token weights set after a forward_for_backward, whose gradient used the ones before");
  PG_CHECK(static_cast<int64_t>(weights.size()) == N, "GpuModel::backward: {} token weights for {} tokens",
           weights.size(), N);
  PG_CUDA_CHECK(cudaEventSynchronize(staging.weights_free));
  std::copy(weights.begin(), weights.end(), staging.weights);
  PG_CUDA_CHECK(cudaMemcpyAsync(io.weights, staging.weights, weights.size() * 4, cudaMemcpyHostToDevice, stream));
  if (selects_head_rows()) {
    // The backward of a head-selected LoRA forward reads the selected rows' weights; the others must be 0.
    const int64_t M = selection.rows;
    int64_t j = 0;  // staging.selected is increasing
    for (int64_t i = 0; i < N; ++i) {
      const float w = weights[static_cast<size_t>(i)];
      if (j < M && staging.selected[j] == i)
        staging.selected_weights[j++] = w;
      else
        PG_CHECK(w == 0.f, "GpuModel: token weight {} at position {}, outside the batch's selected positions "
                 "(losses_from)", w, i);
    }
    PG_CUDA_CHECK(cudaMemcpyAsync(selection.weights, staging.selected_weights, static_cast<size_t>(M) * 4,
                                  cudaMemcpyHostToDevice, stream));
  }
  PG_CUDA_CHECK(cudaEventRecord(staging.weights_free, stream));
}

void GpuModel::Impl::refresh_weights() {
  const bool quantize = train && qat && has_qat_matrices;
  refresh_bf16_weights(params.data(), w16.data(), copies.data(), n_copies, copy_rows, quantize, stream);
  weights_stale = false;
  weights_quantized = quantize;
}

void GpuModel::Impl::prepare_weights() {
  const bool quantize = train && qat && has_qat_matrices;
  if (weights_stale || quantize != weights_quantized) refresh_weights();
  if (lora) lora->impl().prepare(B, stream);
}

// ---- embedding ----------------------------------------------------------------------------------

void GpuModel::Impl::forward_embedding() {
  const ModelConfig& m = cfg;
  EmbeddingAddends add;
  if (m.bigram_vocab_size > 0) {
    // bigram(ids) = ((E[bigram idx] (+ E[trigram idx])) · Pᵀ) · scale
    const int db = m.bigram_dim;
    bigram_hash_indices(io.ids, B, T, m.bigram_vocab_size, io.bigram_idx, stream);
    EmbeddingAddends tri;
    if (m.trigram_hash) {
      trigram_hash_indices(io.ids, B, T, m.bigram_vocab_size, io.trigram_idx, stream);
      tri.ids2 = io.trigram_idx, tri.table2 = W16(gp.w16_bigram_embed);
    }
    embedding_forward(io.bigram_idx, W16(gp.w16_bigram_embed), N, db, io.bigram_h, tri, stream);
    linear(io.bigram_h, db, W16(gp.w16_bigram_proj), static_cast<int>(N), db, d, io.bigram_p, d, false, 0.f);
    add.dense = io.bigram_p, add.dense_scale = P(gp.bigram_scale);
  }
  if (m.bigram_direct_size > 0) {
    direct_bigram_indices(io.ids, B, T, V, m.bigram_direct_size, io.direct_idx, stream);
    add.ids2 = io.direct_idx, add.table2 = W16(gp.w16_bigram_direct);
  }
  embedding_forward(io.ids, W16(gp.w16_tok_emb), N, d, io.e, add, stream);
  rmsnorm_forward(io.e, nullptr, io.x_norm, io.e_rstd, N, d, 1.f, stream);
  if (m.smear_gate) smear_forward(io.x_norm, P(gp.smear_gate), io.x0, B, T, d, stream);
  if (io.ve) {
    // ve = (E_ve[ids] · P_veᵀ) · s_ve [N, kv_dim], shared by the VE layers.
    embedding_forward(io.ids, W16(gp.w16_ve_embed), N, m.ve_dim, io.ve_h, EmbeddingAddends{}, stream);
    linear(io.ve_h, m.ve_dim, W16(gp.w16_ve_proj), static_cast<int>(N), m.ve_dim, kvd, io.ve_p, kvd, false, 0.f);
    scaled_add_forward(io.ve_p, P(gp.ve_scale), io.ve, N * kvd, false, stream);
  }
}

void GpuModel::Impl::backward_embedding() {
  if (frozen) return;  // nothing below x0 but parameters
  const ModelConfig& m = cfg;
  const int n = static_cast<int>(N);
  const float* dnorm = bw.dx0;
  if (m.smear_gate) {
    smear_backward(bw.dx0, io.x_norm, P(gp.smear_gate), bw.dn, G(gp.smear_gate), B, T, d, bw.reduce, stream,
                   /*accumulate=*/false);
    dnorm = bw.dn;
  }
  float* de = bw.dm;
  rmsnorm_backward(dnorm, io.e, nullptr, io.e_rstd, de, N, d, 1.f, 1.f, false, stream);
  embedding_grad(io.ids, de, d, G(gp.tok_emb), V);
  if (m.bigram_vocab_size > 0) {
    const int db = m.bigram_dim;
    bf16* dp = bw.da;
    scaled_add_backward(de, io.bigram_p, P(gp.bigram_scale), dp, G(gp.bigram_scale), N * d, bw.reduce, stream);
    linear_dw(dp, d, io.bigram_h, db, n, db, d, G(gp.bigram_proj));
    linear_dx(dp, d, W16(gp.w16_bigram_proj), n, db, d, bw.dbigram_h, true, 0.f);
    embedding_grad(io.bigram_idx, bw.dbigram_h, db, G(gp.bigram_embed), m.bigram_vocab_size);
    if (m.trigram_hash) embedding_grad(io.trigram_idx, bw.dbigram_h, db, G(gp.bigram_embed), m.bigram_vocab_size);
  }
  if (m.bigram_direct_size > 0) embedding_grad(io.direct_idx, de, d, G(gp.bigram_direct), m.bigram_direct_size);
  if (io.ve) {
    scaled_add_backward(bw.dve, io.ve_p, P(gp.ve_scale), bw.dve_p, G(gp.ve_scale), N * kvd, bw.reduce, stream);
    linear_dw(bw.dve_p, kvd, io.ve_h, m.ve_dim, n, m.ve_dim, kvd, G(gp.ve_proj));
    linear_dx(bw.dve_p, kvd, W16(gp.w16_ve_proj), n, m.ve_dim, kvd, bw.dve_h, true, 0.f);
    embedding_grad(io.ids, bw.dve_h, m.ve_dim, G(gp.ve_embed), V);
  }
}

// ---- forward and backward over the plan -----------------------------------------------------------

void GpuModel::Impl::forward(HeadGrad grad) {
  PG_CHECK(batch_set, "GpuModel::forward: no batch (call set_batch first)");
  head_grad = HeadGrad::None;
  build_plan();
  const int nv = static_cast<int>(order.size());
  if (lora) {
    PG_CHECK(B <= lora->rows() && T <= lora->seq_len(),
             "GpuModel: LoRA adapters are for up to {} rows of {} tokens, the batch has {} rows of {}", lora->rows(),
             lora->seq_len(), B, T);
    PG_CHECK(lora->slots() == nv, "GpuModel: LoRA adapters have {} slots, the layer plan has {} virtual layers",
             lora->slots(), nv);
  }
  prepare_weights();
  // A selective eval forward (no backward may follow) stores only what the forward itself reads on.
  selective_forward = runs_selected_rows();
  head_selected = selects_head_rows();
  PG_CHECK(grad == HeadGrad::None || (has_targets && !selective_forward),
           "GpuModel::forward_for_backward: the batch has no targets, or selects rows for an evaluation (no "
           "backward may follow)");
  PG_CHECK(grad != HeadGrad::Uniform || !head_selected,
           "GpuModel::forward_for_backward: a LoRA forward of selected rows needs token weights");
  forward_embedding();

  const int E = static_cast<int>(plan.encoder.size());
  const bf16* x = io.x0;
  const bf16* lane0 = nullptr;
  const bf16* lane1 = nullptr;
  for (int v = 0; v < nv; ++v) {
    const VirtualLayer& L = order[static_cast<size_t>(v)];
    LayerBuf& b = layers[static_cast<size_t>(v)];
    if (L.opens_lanes) lane0 = lane1 = x;
    const bf16* cur = L.parallel ? lane0 : x;
    b.pre_skip = cur;
    if (L.skip >= 0) {
      // Decoder entry k adds the skip pushed by encoder entry E-1-k (LIFO); in the layer's mix when that
      // also runs the branch below (mix_takes_branch_below).
      const int k = L.skip;
      if (!mix_takes_branch_below(v))
        skip_forward(cur, layers[static_cast<size_t>(E - 1 - k)].out, P(gp.skip_weights) + int64_t{k} * d,
                     gp.skip_gates >= 0 ? P(gp.skip_gates) + int64_t{k} * d : nullptr, b.in, N, d, stream);
      b.x = b.in;
    } else {
      b.x = cur;
    }
    b.lane1 = L.parallel ? lane1 : nullptr;
    forward_layer(v);
    if (L.parallel) {
      lane0 = b.out;
      lane1 = b.out1;
    } else {
      x = b.out;
    }
  }

  // Final hidden state: the residual, or the mean of the two lanes (s1560's "mean" final lane); R rows:
  // all N, or the M selected ones (the last layer's outputs hold only those), whose losses are then
  // put in their places (NaN elsewhere) and averaged for the mean loss.
  const int64_t R = selective_forward || head_selected ? selection.rows : N;
  io.final_x = lane0 ? lane0 : x;
  io.final_x2 = lane0 ? lane1 : nullptr;
  if (head_selected) {  // the selected rows of the last residual (exact: bf16 rows), kept for the backward
    embedding_forward(selection.index, io.final_x, R, d, selection.x_in, EmbeddingAddends{}, stream);
    io.final_x = selection.x_in;
    if (io.final_x2) {
      embedding_forward(selection.index, io.final_x2, R, d, selection.lane1, EmbeddingAddends{}, stream);
      io.final_x2 = selection.lane1;
    }
  }
  rmsnorm_forward(io.final_x, io.final_x2, io.h, io.final_rstd, R, d, 1.f, stream);
  linear(io.h, d, W16(gp.w16_tok_emb), static_cast<int>(R), d, V, io.logits, V, false, 0.f);  // z = h · tok_embᵀ
  lora_forward(LoraTarget::Head, 0, io.h, io.logits, V, head_selected ? selection.tail : 0);
  if (has_targets) {
    const float cap = static_cast<float>(cfg.logit_softcap);
    // With grad, dz overwrites the logits here (as the backward's pass would): the backward's weights.
    const CeGradient dz{io.logits,
                        grad == HeadGrad::Weighted ? (head_selected ? selection.weights : io.weights) : nullptr,
                        static_cast<float>(1.0 / static_cast<double>(N))};
    const CeGradient* ce_grad = grad == HeadGrad::None ? nullptr : &dz;
    if (selective_forward || head_selected) {
      softcap_ce_forward(io.logits, selection.targets, selection.losses, io.lse, R, V, cap, stream, ce_grad);
      scatter_losses(selection.losses, selection.index, R, io.losses, N, stream);
      mean_loss(selection.losses, R, io.loss, stream);
    } else {
      softcap_ce_forward(io.logits, io.targets, io.losses, io.lse, N, V, cap, stream, ce_grad);
      mean_loss(io.losses, N, io.loss, stream);
    }
  }
  head_grad = grad;
  forward_done = true;
}

void GpuModel::Impl::backward(const float* weights_device) {
  PG_CHECK(forward_done, "GpuModel::backward: needs a forward first (a backward consumes the forward's logits)");
  PG_CHECK(has_targets, "GpuModel::backward: the last forward had no targets");
  PG_CHECK(!selective_forward, "GpuModel::backward: the last forward computed only the selected rows (an eval batch "
                               "with losses_from); a backward needs a training-mode forward");
  PG_CHECK(!head_selected || weights_device == io.weights,
           "GpuModel::backward: a LoRA forward of selected rows needs token weights (zero outside the selection)");
  const HeadGrad expected = weights_device ? HeadGrad::Weighted : HeadGrad::Uniform;
  PG_CHECK(head_grad == HeadGrad::None || head_grad == expected,
           "GpuModel::backward: the forward formed the logits' gradient for {} weights",
           head_grad == HeadGrad::Weighted ? "the token" : "uniform");
  const bool dz_done = head_grad != HeadGrad::None;
  head_grad = HeadGrad::None;
  forward_done = false;
  const bool lanes = order.back().parallel;
  // The head's rows: all N, or the R selected ones (their weights; the other rows' gradients are 0).
  const int64_t R = head_selected ? selection.rows : N;
  const int32_t* targets = head_selected ? selection.targets : io.targets;
  const float* weights = head_selected ? selection.weights : weights_device;
  // dz overwrites the logits (unless the forward wrote it); dh = dz · tok_emb, dtok_emb += dzᵀ h.
  if (!dz_done)
    softcap_ce_backward(io.logits, io.lse, targets, weights, static_cast<float>(1.0 / static_cast<double>(N)),
                        io.logits, R, V, static_cast<float>(cfg.logit_softcap), stream);
  linear_dw(io.logits, V, io.h, d, static_cast<int>(R), d, V, G(gp.tok_emb));
  const NormGrad dh = norm_grad_dx(io.logits, V, W16(gp.w16_tok_emb), static_cast<int>(R), d, V, bw.dn,
                                    !has_lora(LoraTarget::Head, 0));
  lora_backward(LoraTarget::Head, 0, io.logits, V, io.h, bw.dn, head_selected ? selection.tail : 0);
  side_join();  // the head's dB and dA read dz (the logits) and the LoRA scratch
  // Through the final norm; with lanes each lane gets half of the mean's gradient. Selected rows: their
  // gradients (in dx0's space, cleared below) put in their places, zeros elsewhere.
  if (head_selected) {
    rmsnorm_backward(dh, io.final_x, io.final_x2, io.final_rstd, bw.dx0, R, d, 1.f, lanes ? 0.5f : 1.f, false,
                     stream);
    scatter_rows_f32(bw.dx0, selection.index, R, d, bw.g, N, stream);
  } else {
    rmsnorm_backward(dh, io.final_x, io.final_x2, io.final_rstd, bw.g, N, d, 1.f, lanes ? 0.5f : 1.f, false, stream);
  }
  if (lanes)
    PG_CUDA_CHECK(cudaMemcpyAsync(bw.g1, bw.g, static_cast<size_t>(N) * d * 4, cudaMemcpyDeviceToDevice, stream));
  const int nv = static_cast<int>(order.size());
  // The layers' mix passes write dx0 and fold the last d x into it (dx0_pass_of); only a model without
  // layers clears it here and adds d x below.
  if (wants_dx0() && nv == 0) PG_CUDA_CHECK(cudaMemsetAsync(bw.dx0, 0, static_cast<size_t>(N) * d * 4, stream));
  // dve and dv0 likewise: cleared only when no layer writes them (first_dve_layer, first_dv0_layer).
  if (wants_dve() && first_dve_layer() < 0)
    PG_CUDA_CHECK(cudaMemsetAsync(bw.dve, 0, static_cast<size_t>(N) * kvd * 4, stream));
  if (bw.dv0 && first_dv0_layer() < 0)
    PG_CUDA_CHECK(cudaMemsetAsync(bw.dv0, 0, static_cast<size_t>(N) * kvd * 4, stream));

  bool mlp_branch_done = false;  // layer v's MLP-branch backward ran in layer v+1's last pass
  for (int v = nv - 1; v >= 0; --v) {
    // The skip into layer v, if any, has its backward in the layer's last pass (skip_into).
    mlp_branch_done = backward_layer(v, mlp_branch_done);
    if (order[static_cast<size_t>(v)].opens_lanes) add_f32(bw.g, bw.g1, N * d, stream);
  }
  if (wants_dx0() && (nv == 0 || !dx0_pass_of(0).takes_dx)) add_f32(bw.dx0, bw.g, N * d, stream);
  backward_embedding();
}

// ---- GpuModel ------------------------------------------------------------------------------------

GpuModel::GpuModel(const ModelConfig& config, const GpuModelOptions& options)
    : impl_(std::make_unique<Impl>(config, options)) {}
GpuModel::~GpuModel() = default;

const ModelConfig& GpuModel::config() const { return impl_->cfg; }
const ParamLayout& GpuModel::layout() const { return impl_->layout; }
cudaStream_t GpuModel::stream() const { return impl_->stream; }
float* GpuModel::params() { return impl_->params.data(); }
size_t GpuModel::gemm_plans() const { return impl_->gemm.cached_plans(); }
double GpuModel::gemm_plan_seconds() const { return impl_->gemm.plan_seconds(); }
float* GpuModel::grads() { return impl_->grads.data(); }

void GpuModel::load_params(const ParamSet<float>& host) {
  PG_CHECK(host.layout().total() == impl_->layout.total(), "GpuModel::load_params: {} values for a layout of {}",
           host.layout().total(), impl_->layout.total());
  PG_CUDA_CHECK(cudaMemcpyAsync(impl_->params.data(), host.all().data(), impl_->params.bytes(),
                                cudaMemcpyHostToDevice, impl_->stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  impl_->weights_stale = true;
}

void GpuModel::store_params(ParamSet<float>& host) const {
  PG_CHECK(host.layout().total() == impl_->layout.total(), "GpuModel::store_params: layout mismatch");
  PG_CUDA_CHECK(cudaMemcpyAsync(host.all().data(), impl_->params.data(), impl_->params.bytes(),
                                cudaMemcpyDeviceToHost, impl_->stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

void GpuModel::store_grads(ParamSet<float>& host) const {
  PG_CHECK(host.layout().total() == impl_->layout.total(), "GpuModel::store_grads: layout mismatch");
  PG_CUDA_CHECK(cudaMemcpyAsync(host.all().data(), impl_->grads.data(), impl_->grads.bytes(), cudaMemcpyDeviceToHost,
                                impl_->stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

void GpuModel::zero_grad() {
  PG_CUDA_CHECK(cudaMemsetAsync(impl_->grads.data(), 0, impl_->grads.bytes(), impl_->stream));
}
void GpuModel::params_changed() { impl_->weights_stale = true; }

void GpuModel::set_train(bool on) { impl_->train = on; }
void GpuModel::set_qat(bool on) { impl_->qat = on; }
void GpuModel::set_looping(bool on) {
  impl_->looping = on;
  impl_->build_plan();
}
void GpuModel::set_frozen_base(bool on) { impl_->frozen = on; }
void GpuModel::set_lora(GpuLora* adapters) {
  Impl& m = *impl_;
  m.lora = adapters;
  if (adapters && m.lora_side_stream && !m.side_ready()) {
    PG_CUDA_CHECK(cudaStreamCreateWithFlags(&m.side.stream, cudaStreamNonBlocking));
    PG_CUDA_CHECK(cudaEventCreateWithFlags(&m.side.fork, cudaEventDisableTiming));
    PG_CUDA_CHECK(cudaEventCreateWithFlags(&m.side.join, cudaEventDisableTiming));
    m.side.gemm = std::make_unique<GemmRunner>();
  }
}
int GpuModel::num_virtual_layers() const { return static_cast<int>(impl_->order.size()); }
int64_t GpuModel::selected_rows() const {
  return impl_->runs_selected_rows() || impl_->selects_head_rows() ? impl_->selection.rows : 0;
}

void GpuModel::set_batch(const Batch& batch) { impl_->set_batch(batch); }
void GpuModel::forward() { impl_->forward(); }
void GpuModel::forward_for_backward(bool weighted) {
  impl_->forward(weighted ? Impl::HeadGrad::Weighted : Impl::HeadGrad::Uniform);
}
void GpuModel::backward() { impl_->backward(nullptr); }
void GpuModel::backward(std::span<const float> token_weights) {
  set_token_weights(token_weights);
  backward_weighted();
}
void GpuModel::set_token_weights(std::span<const float> token_weights) { impl_->upload_token_weights(token_weights); }
void GpuModel::backward_weighted() { impl_->backward(impl_->io.weights); }

void GpuModel::prepare_weights() { impl_->prepare_weights(); }
void GpuModel::refresh_weights() { impl_->refresh_weights(); }
const float* GpuModel::device_loss() const { return impl_->io.loss; }
const float* GpuModel::device_token_losses() const { return impl_->io.losses; }
int GpuModel::physical_layer(int v) const { return impl_->order.at(static_cast<size_t>(v)).physical; }

GpuModel::DeviceLinearInputs GpuModel::linear_inputs(int v) const {
  const Impl& m = *impl_;
  PG_CHECK(v >= 0 && v < num_virtual_layers(), "linear_inputs: virtual layer {} of {}", v, num_virtual_layers());
  const Impl::LayerParams& p = m.lp[static_cast<size_t>(m.order[static_cast<size_t>(v)].physical)];
  const Impl::LayerBuf& b = m.layers[static_cast<size_t>(v)];
  const bf16* wo_in = p.gate_w >= 0 ? b.y_gated : (p.xsa ? b.y_xsa : b.y);
  return {b.n, wo_in, b.m, b.post, m.d, m.qd, m.hid};
}

const __nv_bfloat16* GpuModel::final_norm_device() const { return impl_->io.h; }

double GpuModel::loss() const {
  if (!impl_->has_targets) return 0.0;
  float value = 0.f;
  PG_CUDA_CHECK(cudaMemcpyAsync(&value, impl_->io.loss, 4, cudaMemcpyDeviceToHost, impl_->stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  return value;
}

std::vector<float> GpuModel::token_losses() const {
  if (!impl_->has_targets) return {};
  std::vector<float> out(static_cast<size_t>(impl_->N));
  PG_CUDA_CHECK(cudaMemcpyAsync(out.data(), impl_->io.losses, out.size() * 4, cudaMemcpyDeviceToHost, impl_->stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  return out;
}

std::vector<float> GpuModel::x0() const { return impl_->download_bf16(impl_->io.x0, impl_->N * impl_->d); }

std::vector<float> GpuModel::layer_output(int v, int lane) const {
  PG_CHECK(v >= 0 && v < num_virtual_layers(), "layer_output: virtual layer {} of {}", v, num_virtual_layers());
  const bool parallel = impl_->order[static_cast<size_t>(v)].parallel;
  PG_CHECK(lane == 0 || (lane == 1 && parallel), "layer_output: virtual layer {} has no lane {}", v, lane);
  PG_CHECK(!impl_->selective_forward, "layer_output: the last forward was a selective evaluation, which keeps only the "
           "layer outputs it reads itself");
  const auto& b = impl_->layers[static_cast<size_t>(v)];
  return impl_->download_bf16(lane == 0 ? b.out : b.out1, impl_->N * impl_->d);
}

std::vector<float> GpuModel::layer_activation(int v, const std::string& name) const {
  PG_CHECK(v >= 0 && v < num_virtual_layers(), "layer_activation: virtual layer {} of {}", v, num_virtual_layers());
  const Impl& m = *impl_;
  const Impl::VirtualLayer& L = m.order[static_cast<size_t>(v)];
  const Impl::LayerParams& p = m.lp[static_cast<size_t>(L.physical)];
  const Impl::LayerBuf& b = m.layers[static_cast<size_t>(v)];
  const bool mix = m.mixes_values(v);
  const int64_t N = m.N;
  const std::pair<const char*, std::pair<const bf16*, int64_t>> table[] = {
      {"x_in", {b.x_in, m.d}},
      {"n", {b.n, m.d}},
      {"q", {b.q, m.qd}},
      {"k", {b.k, m.kvd}},
      {"v", {mix ? b.v : b.v_raw, m.kvd}},
      {"y", {b.y, m.qd}},
      {"y_xsa", {p.xsa ? b.y_xsa : nullptr, m.qd}},
      {"a", {b.a, m.d}},
      {"x_mid", {L.parallel ? nullptr : b.x_mid, m.d}},
      {"m", {b.m, m.d}},
      {"pre", {b.pre, m.hid}},
      {"post", {b.post, m.hid}},
      {"f", {b.f, m.d}}};
  for (const auto& [n, t] : table)
    if (name == n) return t.first ? m.download_bf16(t.first, N * t.second) : std::vector<float>{};
  fail("layer_activation: no activation named '{}'", name);
}

std::vector<float> GpuModel::final_norm_output() const {
  return impl_->download_bf16(impl_->io.h, impl_->N * impl_->d);
}

std::vector<float> GpuModel::logits() const {
  PG_CHECK(impl_->forward_done, "GpuModel::logits: no forward since the last backward (which overwrote them)");
  PG_CHECK(impl_->head_grad == Impl::HeadGrad::None,
           "GpuModel::logits: the last forward (forward_for_backward) overwrote them with their gradient");
  PG_CHECK(!impl_->selective_forward, "GpuModel::logits: the last forward computed the selected rows' logits only");
  std::vector<float> z = impl_->download_bf16(impl_->io.logits, impl_->N * impl_->V);
  const float cap = static_cast<float>(impl_->cfg.logit_softcap);
  for (float& x : z) x = cap * std::tanh(x / cap);
  return z;
}

size_t GpuModel::arena_bytes() const { return impl_->arena->capacity(); }

}  // namespace pgolf::cuda
