// CpuModel: the reference GPT of every stack (SPEC §3) on the CPU, in fp32 or fp64, with an explicit
// forward that saves its activations and an explicit backward — the executable specification the
// CUDA engine is tested against.
//
// One forward covers: token embedding (+ BigramHash / TrigramHash or the s600 direct bigram table),
// RMSNorm, SmearGate v1, value embeddings, the layer plan (U-Net skips with optional skip gates,
// depth recurrence, parallel residual lanes), blocks with resid_mix, LN scale, QK-norm, partial
// RoPE with the NTK base, q gain, causal GQA attention over cu_seqlens segments, XSA, gated
// attention, value residual, s600 branch gates, relu²/leaky² MLPs, the tied soft-capped head and
// the cross-entropy. Options for training and evaluation: train/eval mode (late-QAT fake quant in
// train mode only), the looped or plain layer plan, frozen base weights, per-row LoRA adapters.
//
// Gradients accumulate into grads() (PyTorch's .grad semantics): call zero_grad() between steps.
#pragma once

#include <array>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "backend/cpu/rope.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/lora.h"
#include "model/params.h"

namespace pgolf {

// Names of the per-layer activations a forward saves, in the order it computes them (diagnostics:
// CpuModel::layer_activation and its GPU twin). q and k are after QK-norm and RoPE (q with its
// gain), v is what attention read, y its output, y_xsa the XSA output; a and f are the attention and
// MLP branches, x_mid the residual between them, m the MLP norm, pre / post the MLP hidden state.
inline constexpr std::array<const char*, 13> kLayerActivations = {"x_in", "n",     "q",     "k",   "v",
                                                                  "y",    "y_xsa", "a",     "x_mid", "m",
                                                                  "pre",  "post",  "f"};

template <typename T>
class CpuModel {
 public:
  explicit CpuModel(const ModelConfig& config);
  CpuModel(const CpuModel&) = delete;  // holds pointers into itself (RoPE table) and to attached adapters
  CpuModel& operator=(const CpuModel&) = delete;

  const ModelConfig& config() const { return cfg_; }
  ParamSet<T>& params() { return params_; }
  const ParamSet<T>& params() const { return params_; }
  ParamSet<T>& grads() { return grads_; }
  const ParamSet<T>& grads() const { return grads_; }
  void zero_grad() { grads_.zero(); }

  // Train mode enables late-QAT fake quantization when set_qat(true) (SPEC §4.7: per-row int6 STE on
  // the CastedLinear matrices; the banks of banked stacks are not CastedLinear and stay exact).
  void set_train(bool on) { train_ = on; }
  bool train() const { return train_; }
  void set_qat(bool on) { qat_ = on; }
  bool qat() const { return qat_; }
  // The looped layer plan (ModelConfig::layer_plan(true)) or the plain one; takes effect at the next forward.
  void set_looping(bool on);
  bool looping() const { return looping_; }
  // Frozen base weights: backward computes no parameter gradient (only LoRA adapters, if attached, learn).
  void set_frozen_base(bool on) { frozen_ = on; }
  bool frozen_base() const { return frozen_; }
  // bf16 norm-input gradients, as GpuModel stores them (the references' bf16 autocast rounding): the input
  // gradients of the q/k/v products (d n), of the MLP's fc (d m) and of the tied head (d h) are rounded to
  // bf16 where that product is their only term (no LoRA adapter on the layer, no attention gate). Off by
  // default: the golden tensors come from fp32 references.
  void set_bf16_norm_grads(bool on) { bf16_norm_grads_ = on; }
  bool bf16_norm_grads() const { return bf16_norm_grads_; }
  // Attaches per-row LoRA adapters (null detaches). Their rows must equal the batch rows and their
  // slots the number of virtual layers of the plan.
  void set_lora(LoraAdapters<T>* adapters) { lora_ = adapters; }

  const ModelConfig::LayerPlan& plan() const { return plan_; }
  int num_virtual_layers() const { return static_cast<int>(order_.size()); }

  // Runs the model on `batch`; returns the mean cross-entropy over all targets (0 without targets).
  T forward(const Batch& batch);
  // Gradients of the mean loss of the last forward.
  void backward();
  // Gradients of Σ_i weights[i]·loss_i (per-token weights, e.g. TTT's per-document chunk means).
  void backward(std::span<const T> token_weights);

  // Results and saved activations of the last forward.
  std::span<const T> token_losses() const { return losses_; }  // [N]
  std::span<const T> logits() const { return logits_; }        // [N, V], soft-capped
  std::span<const T> x0() const { return x0_; }                // [N, d], the x0 every block mixes in
  std::span<const T> final_norm_output() const { return h_; }  // [N, d]
  int physical_layer(int v) const { return layers_.at(static_cast<size_t>(v)).physical; }
  bool is_parallel(int v) const { return layers_.at(static_cast<size_t>(v)).parallel; }
  // Output of virtual layer v (lane 1 exists only for parallel layers).
  std::span<const T> layer_output(int v, int lane = 0) const;
  // A saved activation of virtual layer v named in kLayerActivations; empty where the layer has none
  // (y_xsa without XSA, x_mid in a parallel layer).
  std::span<const T> layer_activation(int v, const std::string& name) const;
  // Inputs of the quantized matrices of virtual layer v in the last forward (GPTQ calibration, SPEC
  // §5.7): the normed attention input n [N, d] (c_q, c_k, c_v), the attention output entering the
  // output projection [N, q_dim] (after XSA and the gate), the normed MLP input m [N, d] (fc) and the
  // MLP hidden after the activation [N, hidden] (mlp.proj).
  struct LinearInputs {
    std::span<const T> attn_in, proj_in, fc_in, mlp_hidden;
  };
  LinearInputs linear_inputs(int v) const;

 private:
  // Offsets into the parameter layout of one physical layer's tensors (-1: absent in this stack).
  struct LayerParams {
    int64_t wq = -1, wk = -1, wv = -1, wo = -1, wfc = -1, wproj = -1;
    int64_t attn_scale = -1, mlp_scale = -1, resid_mix = -1, q_gain = -1, vr_lambda = -1;
    int64_t gate_w = -1, gate_b = -1, attn_gate = -1, mlp_gate = -1, ve_scale = -1;
    int64_t par_resid = -1, par_post = -1;  // this layer's row of the parallel lambdas
    T ln_scale = T(1);
    bool xsa = false;
  };
  struct AttnActs {
    std::vector<T> q_lin, k_lin, v_raw, v, q_rope, k_rope, q, q_rstd, k_rstd, y, lse, y_xsa, gate_logits, gate, y_out;
    std::vector<T> a;                               // [N, d] attention output (Wo and the O adapter)
    std::vector<T> lora_q, lora_k, lora_v, lora_o;  // saved LoRA hidden states [N, r]
  };
  struct MlpActs {
    std::vector<T> m, m_rstd, pre, post, f, lora_h;
  };
  struct LayerActs {
    int physical = 0;
    bool parallel = false;
    bool opens_lanes = false;  // first parallel layer: lane0 = lane1 = x before it
    int skip = -1;             // decoder index k whose skip was added before this layer, else -1
    std::vector<T> pre_skip;   // x (or lane0) before the skip add
    std::vector<T> x;          // block input (or lane0)
    std::vector<T> lane1;      // parallel: lane1 input
    std::vector<T> x_in, n, n_rstd;
    AttnActs attn;
    std::vector<T> x_mid;               // sequential: after the attention branch
    std::vector<T> a_scaled, f_scaled;  // parallel: attn_scale⊙a, mlp_scale⊙f
    MlpActs mlp;
    std::vector<T> out, out1;  // output (lane0, lane1)
  };

  T* P(int64_t off) { return params_.all().data() + off; }
  const T* P(int64_t off) const { return params_.all().data() + off; }
  const T* P_or_null(int64_t off) const { return off < 0 ? nullptr : P(off); }
  // Gradient slot of a parameter (+ `extra` elements), or null when the base is frozen or the tensor is absent.
  T* G(int64_t off, int64_t extra = 0) { return frozen_ || off < 0 ? nullptr : grads_.all().data() + off + extra; }
  // A weight matrix as the forward sees it: under late QAT a copy of all parameters whose CastedLinear
  // matrices are fake-quantized (straight-through: their gradients go to the exact weights).
  const T* W(int64_t off) const { return (qat_active_ ? qat_weights_.data() : P(0)) + off; }
  int64_t offset(const std::string& name) const;
  int64_t offset_if(const std::string& name) const;

  void build_plan();
  void prepare_qat();
  const cpu::RopeTable& rope_table(int64_t seq_len);
  const typename LoraAdapters<T>::Adapter* adapter(LoraTarget t, int slot) const;
  void lora_forward(LoraTarget t, int slot, const T* x, std::vector<T>& h, T* y);
  void lora_backward(LoraTarget t, int slot, const T* dy, const T* x, const std::vector<T>& h, T* dx);

  void forward_embedding();
  void backward_embedding(const T* dx0);
  void forward_attention(LayerActs& L, const LayerParams& p, int v);
  void backward_attention(LayerActs& L, const LayerParams& p, int v, const T* da, T* dn);
  void forward_mlp(MlpActs& M, const LayerParams& p, const T* input, int v);
  void backward_mlp(MlpActs& M, const LayerParams& p, const T* input, int v, const T* df, T* dinput);
  void forward_layer(LayerActs& L, int v);
  // g (and g1 for parallel layers) hold d(output) on entry and d(input) on return.
  void backward_layer(LayerActs& L, int v, std::vector<T>& g, std::vector<T>& g1);
  // The value tensor attention reads: the value-residual mix, or the raw projection.
  const std::vector<T>& values(const AttnActs& A) const { return cfg_.value_residual ? A.v : A.v_raw; }
  void backward_from(std::span<const T> dloss);

  ModelConfig cfg_;
  ParamSet<T> params_, grads_;
  std::vector<LayerParams> layer_params_;  // per physical layer
  struct {
    int64_t tok_emb = -1, bigram_embed = -1, bigram_proj = -1, bigram_scale = -1, bigram_direct = -1;
    int64_t smear_gate = -1, ve_embed = -1, ve_proj = -1, ve_scale = -1, skip_weights = -1, skip_gates = -1;
  } gp_;
  struct Matrix {
    int64_t offset, rows, cols;
  };
  std::vector<Matrix> qat_matrices_;  // the CastedLinear matrices late QAT fake-quantizes
  std::vector<T> qat_weights_;
  bool train_ = true, qat_ = false, qat_active_ = false, looping_ = false, frozen_ = false;
  bool bf16_norm_grads_ = false;
  LoraAdapters<T>* lora_ = nullptr;

  ModelConfig::LayerPlan plan_;
  std::vector<int> order_;  // physical layer per virtual position (encoder then decoder)
  std::map<int64_t, cpu::RopeTable> rope_tables_;

  // The last forward's batch and activations.
  int64_t B_ = 0, T_ = 0, N_ = 0;
  std::vector<int32_t> ids_, targets_, positions_, cu_;
  std::vector<int32_t> bigram_idx_, trigram_idx_;
  std::vector<T> e_, bigram_h_, bigram_p_, e_rstd_, x_norm_, x0_;
  std::vector<T> ve_h_, ve_p_, ve_;
  std::vector<LayerActs> layers_;
  std::vector<T> final_in_, final_rstd_, h_, logits_, lse_, losses_, lora_head_h_;
  const cpu::RopeTable* rope_ = nullptr;
  // Backward accumulators shared across layers: d x0, d ve (value embedding), d v0 (value residual).
  std::vector<T> dx0_, dve_, dv0_;
};

}  // namespace pgolf
