// GpuModel: the GPU twin of CpuModel<float> (model/cpu_model.h) — the same ModelConfig, ParamLayout,
// Batch semantics, modes and outputs, computed with bf16 activations and GEMM operands, fp32
// accumulation, fp32 master weights and fp32 gradients:
//   * parameters and gradients: two device arrays of layout().total() floats in ParamLayout order;
//     the GEMMs and lookups read bf16 copies of the matrices and tables (with late-QAT fake
//     quantization in train mode), refreshed at the next forward after params_changed();
//   * activations: one arena sized at construction from (max_tokens, config); no allocation, no host
//     synchronisation inside set_batch's successors forward() / backward(), so a step can be captured
//     in a CUDA graph;
//   * every op is a launcher of backend/cuda (one .cu/.h pair each, tested against its CPU twin).
// Gradients accumulate into grads() across backward calls (PyTorch .grad semantics) until zero_grad().
//
// A CudaEngine is a thin layer on top: it owns the optimizer over params()/grads() (calling
// params_changed() after each step), feeds batches through set_batch / forward / backward, and reads
// losses with loss() / token_losses().
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/batch.h"
#include "model/config.h"
#include "model/lora.h"
#include "optim/update_math.h"
#include "backend/cuda/attention.h"
#include "model/params.h"

namespace pgolf::cuda {

class GpuLora;

enum class QkvProduct {
  separate,    // cuBLASLt, then qk_norm_rope_forward
  evaluation,  // fused in selective evaluation forwards (Batch::losses_from), separate elsewhere
  fused,       // fused in every forward
};

struct GpuModelOptions {
  int64_t max_tokens = 0;      // the largest batch (rows · seq_len) set_batch will be given
  bool deterministic = false;  // backward without atomics: the embedding and attention dQ kernels that
                               // sum in a fixed order (same bits on every run; slower)
  AttentionTuning attention{};  // the flash attention kernels (its `deterministic` is the one above)
  // The MLP's first product and its gradient with the activation in the epilogue (mlp_gemm.h) where
  // the shape and device allow; otherwise cuBLASLt and the separate activation passes.
  bool mlp_fused = true;
  // Where the attention's input product runs with QK-norm, RoPE and the q gain in its epilogue
  // (mlp_gemm.h, qkv_fused_forward), if the shape and device allow and no LoRA adapter adds to q or k;
  // elsewhere cuBLASLt and qk_norm_rope_forward. Measured on an H100 (bench_cuda --only qkv, 98,304
  // rows): 0.277 against 0.300 ms where qkv's q and k columns are not written (a selective evaluation
  // forward, which no backward follows), 0.311 where they are (a training forward).
  QkvProduct qkv_product = QkvProduct::evaluation;
  // The attention backward leaves dQ as its fp32 sum and qk_norm_rope_backward rounds it (no finish
  // pass, no bf16 dq round trip; the same bits). Flash kernels only, not in deterministic mode.
  bool fold_dq_finish = true;
  // A norm's input gradient stored bf16 where one GEMM writes it alone (norm_grad.h: the references'
  // autocast precision, half the bytes); false keeps every norm gradient fp32.
  bool bf16_norm_grads = true;
  // LoRA's weight-gradient products (dA, dB) on a second stream, a branch of the captured graph that
  // joins the backward at the end of each attention, MLP and head part: off the backward's chain of
  // dependent launches. The same products, so the same bits.
  bool lora_side_stream = true;
};

class GpuModel {
 public:
  GpuModel(const ModelConfig& config, const GpuModelOptions& options);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const ModelConfig& config() const;
  const ParamLayout& layout() const;
  cudaStream_t stream() const;  // every launch goes to this stream

  // ---- parameters and gradients (device, fp32, ParamLayout order) --------------------------------
  float* params();
  float* grads();
  void load_params(const ParamSet<float>& host);  // host → device (waits), bf16 copies marked stale
  void store_params(ParamSet<float>& host) const;  // device → host (waits)
  void store_grads(ParamSet<float>& host) const;
  void zero_grad();       // async
  void params_changed();  // params() were written on the device: refresh the bf16 copies at the next forward
  // The bf16 copies for the current mode (train + late QAT quantizes), refreshed only when stale or of
  // the other mode (what forward() does first) — or unconditionally, stream-ordered: a captured step ends
  // with refresh_weights() so that the next replay's forward finds them fresh.
  void prepare_weights();
  void refresh_weights();

  // ---- modes (as CpuModel) ------------------------------------------------------------------------
  void set_train(bool on);
  void set_qat(bool on);
  void set_looping(bool on);
  void set_frozen_base(bool on);
  void set_lora(GpuLora* adapters);  // null detaches; rows = batch rows, slots = virtual layers
  int num_virtual_layers() const;

  // ---- one batch ------------------------------------------------------------------------------------
  // Validates the batch (Batch::validate, tokens ≤ max_tokens) and copies its ids, targets and segments
  // to the device through pinned staging memory, asynchronously (the one host → device transfer of a
  // step, before the captured region). The batch may be freed on return.
  void set_batch(const Batch& batch);
  void forward();   // async: loss, per-token losses and saved activations of the batch
  // With Batch::losses_from, an eval-mode forward without LoRA (head_dim 64) runs the last layer after
  // attention, the final norm and the head on the M selected positions only: token_losses() holds NaN
  // at the others, loss() is the mean over the M, the last layer's activations, the final norm and the
  // logits hold those M rows at their front, and backward() refuses to run. With LoRA, when every row
  // selects its last k positions (LoRA TTT's chunks), every layer runs on all rows but the final norm,
  // the head with its adapter and the loss run on the M = B·k selected rows (NaN at the others, as
  // above); backward() then needs token weights, zero outside the selection. selected_rows() is M when
  // the next forward does either (modes and batch as now), else 0.
  int64_t selected_rows() const;
  void backward();  // gradients of the mean loss of the last forward (needs targets)
  // The forward of a step whose backward follows at once: the loss's gradient with respect to the logits
  // is formed in the same pass over them (which it overwrites), and the backward starts after it. The
  // backward must be backward() (weighted = false) or backward_weighted() with the token weights set
  // before this call (weighted = true); logits() refuses until the next plain forward.
  void forward_for_backward(bool weighted);
  // Gradients of Σ_i weights[i]·loss_i (host weights are uploaded first).
  void backward(std::span<const float> token_weights);
  // The same in two parts: the upload (before a captured region), then the backward that reads it.
  void set_token_weights(std::span<const float> token_weights);
  void backward_weighted();

  // ---- results of the last forward (each waits for the stream) -------------------------------------
  double loss() const;                     // mean cross-entropy (0 without targets)
  std::vector<float> token_losses() const;  // [N] (empty without targets)
  std::vector<float> x0() const;                       // [N, d]
  std::vector<float> layer_output(int v, int lane = 0) const;  // [N, d]; lane 1 of parallel layers
  // A saved activation of virtual layer v named in kLayerActivations (model/cpu_model.h), as
  // CpuModel::layer_activation: empty where the layer has none.
  std::vector<float> layer_activation(int v, const std::string& name) const;
  std::vector<float> final_norm_output() const;        // [N, d]
  std::vector<float> logits() const;  // soft-capped [N, V]; valid until backward() overwrites them

  size_t arena_bytes() const;  // device memory of activations and workspaces

  // ---- device views of the last forward (stream-ordered readers: CudaEngine) -------------------------
  const float* device_loss() const;          // the mean loss (1 float)
  const float* device_token_losses() const;  // [N]
  int physical_layer(int v) const;
  // The inputs of virtual layer v's quantized matrices (as CpuModel::linear_inputs), bf16 [N, cols].
  struct DeviceLinearInputs {
    const __nv_bfloat16 *attn_in, *proj_in, *fc_in, *mlp_hidden;
    int attn_cols, proj_cols, mlp_cols;  // d (attn_in, fc_in), q_dim (proj_in), hidden (mlp_hidden)
  };
  DeviceLinearInputs linear_inputs(int v) const;
  const __nv_bfloat16* final_norm_device() const;  // [N, d]
  // The model's cuBLASLt plans so far, and the host seconds spent building them.
  size_t gemm_plans() const;
  double gemm_plan_seconds() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Per-row LoRA adapters on the device (twin of LoraAdapters<float>, same flat layout): fp32 parameters
// and gradients, bf16 copies for the GEMMs, and the hidden states of the last forward.
class GpuLora {
 public:
  // Batches of up to `rows` rows of up to `seq_len` tokens (row b uses adapter b; the hidden states
  // of a smaller batch are packed at the front of their buffers); slots = virtual layers of the
  // plan the model runs. rank, d, q/kv dims and the vocab must be multiples of 8 (GEMM rows of 16
  // bytes).
  GpuLora(const ModelConfig& model, const LoraConfig& config, int64_t rows, int slots, int64_t seq_len);
  ~GpuLora();
  GpuLora(const GpuLora&) = delete;
  GpuLora& operator=(const GpuLora&) = delete;

  const LoraConfig& config() const;
  int64_t rows() const;
  int slots() const;
  int64_t seq_len() const;
  int64_t total() const;  // floats of params() and grads()
  float* params();
  float* grads();
  void upload(std::span<const float> params);  // host → device (the LoraAdapters<float> layout)
  void download_params(std::span<float> out) const;  // into `out` (total() values; pinned memory copies fastest)
  // draw_lora_params with Rng(seed) on the device (the same bits): A ~ U(±1/√in), B = 0.
  void draw(uint64_t seed, cudaStream_t stream);
  // Parameters of `other` (same rows, slots and layout; any seq_len), copied on the device.
  void copy_params_from(const GpuLora& other, cudaStream_t stream);
  std::vector<float> download_grads() const;
  void zero_grad();
  void params_changed();  // params() were written on the device: the bf16 copies refresh at the next forward
  // With `on`, a backward writes the adapters' gradients instead of adding to them: every adapter is
  // reached once per backward, so a step needs no zeroing (rows beyond the batch keep stale values).
  void set_overwrite_grads(bool on);
  // For a batch of `rows` rows (the documents with chunks left): one AdamW step of their parameters
  // (moments in the same layout, coefficients on the device; the bf16 copies of those rows are written
  // too; exp_avg null when beta1 = 0). The other rows keep their values: their documents are done.
  void adamw_rows(int64_t rows, float* exp_avg, float* exp_avg_sq, const optim::AdamCoeffs* coeffs,
                  cudaStream_t stream);

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace pgolf::cuda
