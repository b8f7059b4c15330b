// GpuModel internals shared by gpu_model.cpp (construction, buffers, embedding, head, plan walk) and
// gpu_layer.cpp (the blocks). Not part of the interface.
#pragma once

#include <cuda_bf16.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/lora.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/gpu_model.h"
#include "backend/cuda/norm_grad.h"
#include "backend/cuda/partial_sums.h"
#include "backend/cuda/residual.h"
#include "backend/cuda/weights.h"

namespace pgolf::cuda {

using bf16 = __nv_bfloat16;

struct GpuLora::Impl {
  LoraConfig config;
  int64_t rows = 0, seq_len = 0;
  int slots = 0;
  std::vector<LoraAdapterLayout> adapters;
  int64_t total = 0;
  DeviceBuffer<float> params, grads;
  DeviceBuffer<bf16> params16;
  // Per adapter: h [rows·T, rank] of the last forward (null when absent), a column slice of its
  // group's [rows·T, group_size·rank] (row stride group_size·rank).
  std::vector<bf16*> hidden;
  DeviceBuffer<bf16> hidden_storage, dh;  // dh: [rows·T, largest group_size·rank] scratch of the backward
  // Per slot: the input the group's lora_group_hidden read in the last forward (its members' products
  // read the h it wrote), for the checks of the calls that use it.
  std::vector<const bf16*> group_input;
  // Every adapter matrix as a row segment (A and B of each adapter), for the kernels that touch only
  // the rows a batch uses: a LoRA TTT batch shrinks to the documents with chunks left.
  DeviceBuffer<LoraRowSegment> segments;
  int segment_count = 0;
  int64_t max_per_row = 0;
  bool stale = true;      // params changed since params16 was cast (all rows)
  bool overwrite_grads = false;  // set_overwrite_grads
  int64_t cast_rows = 0;  // rows [0, cast_rows) of params16 are current when !stale

  const LoraAdapterLayout* find(LoraTarget target, int slot) const;
  bf16* hidden_of(LoraTarget target, int slot) const;
  bf16* hidden_at(const LoraAdapterLayout* adapter) const { return hidden[static_cast<size_t>(adapter - adapters.data())]; }
  // The first adapter of slot's q/k/v/o group when it has more than one member, else null.
  const LoraAdapterLayout* group_lead(int slot) const;
  // Casts rows [0, rows) of params to params16 unless they are current.
  void prepare(int64_t rows, cudaStream_t stream);
};

struct GpuModel::Impl {
  // ---- configuration ---------------------------------------------------------------------------
  ModelConfig cfg;
  ParamLayout layout;
  int64_t max_tokens = 0;
  bool deterministic = false;
  AttentionTuning attention;  // flash attention kernels, with `deterministic`
  bool mlp_fused = false;      // the fused MLP kernels serve this model (options, shape and device)
  bool qkv_fused = false;      // the QKV product with QK-norm + RoPE in its epilogue serves it (the same)
  bool qkv_fused_everywhere = false;  // ... in every forward, not only the selective evaluation ones
  bool fold_dq_finish = false;  // qk_norm_rope_backward reads attention's fp32 dQ sum (options, head dim, mode)
  bool bf16_norm_grads = true;  // norm gradients stored bf16 where one GEMM writes them alone (options)
  bool lora_side_stream = true;  // LoRA weight gradients on `side` (options)
  int d = 0, qd = 0, kvd = 0, hid = 0, V = 0, H = 0, Hkv = 0, Dh = 0;
  int qkv_w = 0;    // columns of the fused projection output: q_dim + 2·kv_dim
  int gate_ld = 0;  // row stride of the gated-attention logits (H rounded up to 8)
  cudaStream_t stream = nullptr;
  GemmRunner gemm;

  // fp32 offsets of one physical layer's tensors (-1: absent), as CpuModel's LayerParams.
  struct LayerParams {
    int64_t wq = -1, wk = -1, wv = -1, wo = -1, wfc = -1, wproj = -1;
    int64_t attn_scale = -1, mlp_scale = -1, resid_mix = -1, q_gain = -1, vr_lambda = -1;
    int64_t gate_w = -1, gate_b = -1, attn_gate = -1, mlp_gate = -1, ve_scale = -1;
    int64_t par_resid = -1, par_post = -1;
    bool qkv_contiguous = false;  // c_q, c_k, c_v adjacent in the layout: one dW GEMM
    float ln_scale = 1.f;
    bool xsa = false;
    // bf16 copy offsets: [Wq; Wk; Wv] [qkv_w, d], Wo [d, q_dim], Wfc [hid, d], Wproj [d, hid], Wg [H, d]
    int64_t w16_qkv = -1, w16_o = -1, w16_fc = -1, w16_proj = -1, w16_gate = -1;
  };
  std::vector<LayerParams> lp;
  struct {
    int64_t tok_emb = -1, bigram_embed = -1, bigram_proj = -1, bigram_scale = -1, bigram_direct = -1;
    int64_t smear_gate = -1, ve_embed = -1, ve_proj = -1, ve_scale = -1, skip_weights = -1, skip_gates = -1;
    int64_t w16_tok_emb = -1, w16_bigram_embed = -1, w16_bigram_proj = -1, w16_bigram_direct = -1;
    int64_t w16_ve_embed = -1, w16_ve_proj = -1;
  } gp;

  DeviceBuffer<float> params, grads;
  DeviceBuffer<bf16> w16;
  DeviceBuffer<WeightCopy> copies;
  int n_copies = 0;
  int64_t copy_rows = 0;
  bool weights_stale = true, weights_quantized = false, has_qat_matrices = false;

  // ---- modes and plan --------------------------------------------------------------------------
  bool train = true, qat = false, looping = false, frozen = false;
  GpuLora* lora = nullptr;
  ModelConfig::LayerPlan plan;
  struct VirtualLayer {
    int physical = 0;
    bool parallel = false, opens_lanes = false;
    int skip = -1;  // decoder index k whose skip is added before this layer
  };
  std::vector<VirtualLayer> order;
  int max_virtual = 0;  // activation slots: the larger of the two plans

  // ---- the batch on the device ------------------------------------------------------------------
  // Pinned host staging of the uploads (ids, targets, cu_seqlens, token weights): the copies are
  // asynchronous; `staging_free` is recorded after them and waited on before the staging is reused.
  struct PinnedStaging {
    int32_t *ids = nullptr, *targets = nullptr, *cu = nullptr;
    int32_t *selected = nullptr, *selected_targets = nullptr, *query_begin = nullptr;  // see `selection`
    float* weights = nullptr;
    float* selected_weights = nullptr;  // the token weights of the selected rows
    cudaEvent_t free = nullptr;
    // The token weights have their own: set_batch records `free` after the batch's copies, which wait
    // behind the work already queued; the weights uploaded after it must not wait for those.
    cudaEvent_t weights_free = nullptr;
  } staging;
  int64_t B = 0, T = 0, N = 0;
  int num_segments = 0, max_seqlen = 0;
  bool has_targets = false, batch_set = false, forward_done = false;
  std::map<int64_t, std::pair<DeviceBuffer<float>, DeviceBuffer<float>>> rope_tables;  // cos, sin per T
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
  // Batch::losses_from: the M positions whose losses are read. An eval forward without LoRA (and with
  // the flash attention kernels) computes the last layer's keys and values for all N rows but its
  // query side (attention for the query tiles holding selected rows, then XSA, gate, Wo, the
  // branches, the MLP), the final norm, the head and the loss on the M selected rows only.
  struct {
    bool requested = false;  // the batch selects 0 < M < N positions
    int64_t rows = 0;        // M
    int32_t* index = nullptr;        // [M] token index of each selected row, increasing (device)
    int32_t* targets = nullptr;      // [M] their targets
    int32_t* query_begin = nullptr;  // [segments] segment-local first selected position (AttentionShape)
    float* losses = nullptr;         // [M]
    float* weights = nullptr;        // [M] their token weights (upload_token_weights)
    bf16 *y = nullptr, *vals = nullptr, *n = nullptr, *x_in = nullptr, *x = nullptr, *lane1 = nullptr;  // gathered
    int64_t tail = 0;  // every row selects its last `tail` positions (0: the rows select differently)
  } selection;
  // The last forward computed the selected rows only (set as it begins); it stored only the activations it
  // reads itself (no MLP pre, no skip outputs, layer outputs only where a skip reads them).
  bool selective_forward = false;
  // A LoRA forward whose rows all select their last `tail` positions runs every layer on all rows (the
  // backward needs them) but the final norm, the head (and its adapter, over rows of `tail` tokens) and
  // the loss on the M selected rows only; its backward starts from them (the other rows' weights are 0).
  bool head_selected = false;  // the last forward did so
  bool selects_head_rows() const;

  // ---- activations and workspaces (one arena) ----------------------------------------------------
  std::unique_ptr<Arena> arena;
  struct LayerBuf {
    bf16* in = nullptr;  // block input after a skip add (own buffer in decoder slots)
    bf16 *x_in = nullptr, *n = nullptr;
    float* n_rstd = nullptr;
    bf16 *qkv = nullptr, *q = nullptr, *k = nullptr, *v_raw = nullptr, *v = nullptr, *y = nullptr;
    float *q_rstd = nullptr, *k_rstd = nullptr, *lse = nullptr;
    bf16 *y_xsa = nullptr, *y_gated = nullptr;
    float *gate_logits = nullptr, *gate = nullptr;
    bf16* a = nullptr;
    bf16 *x_mid = nullptr, *m = nullptr;
    float* m_rstd = nullptr;
    bf16 *pre = nullptr, *post = nullptr, *f = nullptr, *out = nullptr, *out1 = nullptr;
    // Set by the forward: the tensors this layer read.
    const bf16* x = nullptr;         // block input (lane 0 for parallel layers)
    const bf16* lane1 = nullptr;     // parallel: lane 1 input
    const bf16* pre_skip = nullptr;  // the input before the skip add
  };
  std::vector<LayerBuf> layers;
  // The rows a layer's query side runs on after attention: all N (the layer's own tensors) or the M
  // selected ones (gathered copies); outputs go to the first `count` rows of the layer's buffers.
  struct LayerRows {
    int64_t count = 0;
    const bf16 *y = nullptr, *vals = nullptr, *n = nullptr, *x_in = nullptr, *x = nullptr, *lane1 = nullptr;
  };
  struct {
    int32_t *ids = nullptr, *targets = nullptr, *cu = nullptr;
    int32_t *bigram_idx = nullptr, *trigram_idx = nullptr, *direct_idx = nullptr;
    bf16 *e = nullptr, *x_norm = nullptr, *x0 = nullptr, *bigram_h = nullptr, *bigram_p = nullptr;
    bf16 *ve_h = nullptr, *ve_p = nullptr, *ve = nullptr;
    float* e_rstd = nullptr;
    bf16* h = nullptr;  // final norm output
    const bf16 *final_x = nullptr, *final_x2 = nullptr;
    float* final_rstd = nullptr;
    bf16* logits = nullptr;  // raw logits z [N, V]; dz after the backward
    float *losses = nullptr, *lse = nullptr, *loss = nullptr, *weights = nullptr;
  } io;
  struct {
    float *g = nullptr, *g1 = nullptr, *dn = nullptr, *dm = nullptr, *dx0 = nullptr;
    float *dve = nullptr, *dv0 = nullptr, *dv_xsa = nullptr;
    bf16 *da = nullptr, *df = nullptr, *dy = nullptr, *dy2 = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
    bf16 *dqkv = nullptr, *dpost = nullptr, *dgate_logits = nullptr;
    float *dbigram_h = nullptr, *dve_h = nullptr;
    bf16* dve_p = nullptr;
    std::vector<float*> d_enc;  // per encoder slot: the gradient its skip connection sends back
    void* attn_ws = nullptr;
    size_t attn_ws_bytes = 0;
    void* sort_ws = nullptr;  // deterministic mode: the sorted embedding backward
    size_t sort_ws_bytes = 0;
    ReduceWorkspace reduce;
  } bw;

  // ---- construction (gpu_model.cpp) ---------------------------------------------------------------
  Impl(const ModelConfig& config, const GpuModelOptions& options);
  ~Impl();
  int64_t offset(const std::string& name) const;
  int64_t offset_if(const std::string& name) const;
  void build_weight_copies();
  void build_plan();
  template <typename Alloc>
  void allocate(Alloc& take);
  size_t reduce_floats() const;

  // ---- one step ---------------------------------------------------------------------------------
  void set_batch(const Batch& batch);
  void upload_token_weights(std::span<const float> weights);
  void upload_selection(const Batch& batch, const std::vector<int32_t>& cu);
  void prepare_weights();
  void refresh_weights();
  // The loss's gradient with respect to the logits formed by the forward (forward_for_backward), and for
  // which weights: the backward then skips that pass.
  enum class HeadGrad { None, Uniform, Weighted };
  HeadGrad head_grad = HeadGrad::None;
  void forward(HeadGrad grad = HeadGrad::None);
  void backward(const float* weights_device);
  void forward_embedding();
  void backward_embedding();
  void forward_layer(int v);
  // Whether layer v's mix also runs layer v−1's MLP branch and the skip between them (ResidualBelow):
  // both layers sequential, so that layer v−1's output feeds v's mix and nothing else before it.
  bool mix_takes_branch_below(int v) const;
  // Returns whether its last pass also ran layer v−1's MLP-branch backward (mlp_branch_done for v−1).
  bool backward_layer(int v, bool mlp_branch_done);
  // Whether the backward forms d x0 (not with a frozen base: nothing below x0 learns), and how layer v's
  // mix pass treats it.
  bool wants_dx0() const;
  Dx0Pass dx0_pass_of(int v) const;
  // Whether layer v adds the value embeddings; whether the backward forms their gradient dve (not with a
  // frozen base); the backward's first layers to add into dv0 and dve (-1: none), which write them.
  bool uses_ve(int v) const;
  bool wants_dve() const;
  int first_dv0_layer() const;
  int first_dve_layer() const;
  const float* skip_grad_of(int v) const;
  bool is_skip_source(int v) const;  // a decoder skip reads virtual layer v's output
  bool folds_mlp_branch_below(int v) const;
  SkipBelow skip_into(int v);
  BranchBelow mlp_branch_of(int v);
  bool runs_selected_rows() const;
  void forward_attention(int v, bool selected_queries);  // through attention (b.y); optionally the selected tiles only
  void forward_attention_output(int v, const LayerRows& rows);  // XSA, gate, Wo → b.a
  void forward_layer_rows(int v, const LayerRows& rows);         // after attention: branches, MLP → b.out (b.out1)
  LayerRows all_rows(int v) const;
  LayerRows gather_selected_rows(int v);
  NormGrad backward_attention(int v);  // from bw.da → d n in bw.dn's storage (fp32 or bf16, returned)
  void forward_mlp(int v, const bf16* input, int64_t rows);
  NormGrad backward_mlp(int v);  // from bw.df → d m in bw.dm's storage (fp32 or bf16, returned)

  // ---- helpers ----------------------------------------------------------------------------------
  float* P(int64_t off) { return params.data() + off; }
  float* P_or_null(int64_t off) { return off < 0 ? nullptr : params.data() + off; }
  // Gradient slot (+ extra elements), or null when the base is frozen or the tensor absent.
  float* G(int64_t off, int64_t extra = 0) { return frozen || off < 0 ? nullptr : grads.data() + off + extra; }
  const bf16* W16(int64_t off) const { return w16.data() + off; }
  // y [rows, out] (row stride ld_y) = beta·y + x [rows, in] (ld_x) · Wᵀ
  void linear(const bf16* x, int64_t ld_x, const bf16* w, int rows, int in, int out, void* y, int64_t ld_y,
              bool f32_out, float beta);
  // dx [rows, in] = beta·dx + dy [rows, out] (ld_dy) · W
  void linear_dx(const bf16* dy, int64_t ld_dy, const bf16* w, int rows, int in, int out, void* dx, bool f32_out,
                 float beta);
  // d input [rows, in] = dy · W, the gradient of a norm's output, into `storage` ([rows, in] fp32): stored bf16
  // when this product is its only term (`sole`; norm_grad.h), else fp32 for the terms added after it.
  NormGrad norm_grad_dx(const bf16* dy, int64_t ld_dy, const bf16* w, int rows, int in, int out, float* storage,
                        bool sole);
  // dW [out, in] (fp32) += dyᵀ · x
  void linear_dw(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x, int rows, int in, int out, float* dw);
  // Over the batch's B rows of T tokens, or of `row_tokens` when given (the head's selected rows). A
  // member of a q/k/v/o group reads the h of lora_group_hidden (called first, on the same x); its
  // backward leaves d h in the group's scratch for lora_group_backward (called after every member's).
  void lora_forward(LoraTarget target, int slot, const bf16* x, bf16* y, int64_t y_ld, int64_t row_tokens = 0);
  void lora_backward(LoraTarget target, int slot, const bf16* dy, int64_t dy_ld, const bf16* x, float* dx,
                     int64_t row_tokens = 0);
  // The group's h = x·[A_q; A_k; …]ᵀ in one product; and its dA, dx += d h·[A_q; A_k; …] in one each.
  void lora_group_hidden(int slot, const bf16* x);
  void lora_group_backward(int slot, const bf16* x, float* dx);
  // The side stream of the LoRA weight-gradient products: side_fork() makes it wait for the work queued on
  // `stream` so far (opening a branch), side_join() makes `stream` wait for the side's work (a no-op with
  // no branch open). Every buffer the side reads stays unchanged until the join at the end of its part.
  struct {
    cudaStream_t stream = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
    std::unique_ptr<GemmRunner> gemm;  // its own cuBLASLt workspace
    bool open = false;
  } side;
  bool side_ready() const { return side.stream != nullptr; }
  void side_fork();
  void side_join();
  // Whether an adapter is attached to target in slot (its lora_backward then adds to dx).
  bool has_lora(LoraTarget target, int slot) const { return lora && lora->impl().find(target, slot); }
  AttentionShape attention_shape() const;
  // dtable[ids[i]] += dout[i] for the batch's N tokens: atomics, or the sorted sums in deterministic mode.
  void embedding_grad(const int32_t* ids, const float* dout, int dim, float* dtable, int table_rows);
  // The value tensor attention reads in virtual layer v: the value-residual mix, or the raw projection
  // (also for the first layer of a stack that does not mix it).
  bool mixes_values(int v) const { return cfg.value_residual && !(v == 0 && !cfg.value_residual_layer0_mix); }
  std::vector<float> download_bf16(const bf16* p, int64_t n) const;
};

}  // namespace pgolf::cuda
