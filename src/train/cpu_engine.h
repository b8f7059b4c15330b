// CpuEngine: the Engine on the CPU reference model (fp32), with the CPU optimizers. It is what CI
// trains and evaluates with, and what the distributed logic is tested on (thread communicator).
#pragma once

#include <memory>
#include <optional>

#include "core/config.h"
#include "dist/communicator.h"
#include "model/cpu_model.h"
#include "model/engine.h"
#include "optim/averaging.h"
#include "optim/optimizer.h"

namespace pgolf {

class CpuEngine final : public Engine {
 public:
  // `config` gives the model, the optimizer groups, clipping and the EMA decay; `comm` the ranks
  // (it must outlive the engine). Parameters start zero: load_params or init them.
  CpuEngine(const Config& config, Communicator& comm);

  const ModelConfig& model_config() const override { return model_.config(); }
  const ParamLayout& layout() const override { return model_.params().layout(); }
  const char* backend_name() const override { return "cpu"; }

  void load_params(const ParamSet<float>& params) override;
  void store_params(ParamSet<float>& params) const override;
  TensorMap optimizer_state() const override;
  void load_optimizer_state(const TensorMap& state, const std::string& what) override;
  void init_ema() override;
  void store_ema(ParamSet<float>& out) const override;

  void set_looping(bool on) override { model_.set_looping(on); }
  void set_qat(bool on) override { model_.set_qat(on); }

  StepResult train_step(std::span<const Batch> micro_batches, const StepControl& control) override;
  void token_losses(const Batch& batch, std::vector<float>& nll) override;

  void ttt_begin(const TttOptimizerConfig& config) override;
  double ttt_step(const Batch& batch, double lr_scale) override;
  void ttt_end() override;

  void lora_begin(const LoraConfig& lora, int64_t rows, const LoraOptimizerConfig& opt) override;
  void lora_reset(uint64_t seed) override;
  void lora_score_and_train(const Batch& batch, std::span<const float> token_weights,
                            std::vector<float>& nll) override;
  void lora_train_step(const Batch& batch, std::span<const float> token_weights) override;
  void lora_end() override;

  void accumulate_hessians(const Batch& batch, TensorMap& hessians) override;

  CpuModel<float>& model() { return model_; }

 private:
  // Averages the gradients across ranks and clips them as configured; returns the norm before clipping.
  // With `banks_local` (Parallel Muon) the bank gradients stay local — the optimizer reduce-scatters
  // them — and the replicated gradients are packed into one buffer and all-reduced in one collective.
  double reduce_and_clip(bool clip_local, double max_norm, bool banks_local);
  void lora_optimizer_step(int64_t rows);

  CpuModel<float> model_;
  Communicator& comm_;
  optim::Optimizer optimizer_;
  std::optional<optim::Ema> ema_;
  double ema_decay_;
  double grad_clip_norm_;
  bool grad_clip_local_;
  // Banked stacks step with Parallel Muon; the replicated (non-bank) parameters' runs into the packed
  // all-reduce buffer (optim/parallel_muon_plan.h).
  bool parallel_muon_ = false;
  std::vector<optim::CopyRun> replicated_runs_;
  std::vector<float> replicated_buffer_;

  // Score-first TTT over the base weights.
  struct TttState {
    TttOptimizerConfig config;
    std::vector<float> buf1, buf2;  // SGD momentum / AdamW moments, layout order
    std::vector<float> lr_mult;     // per-element LR multiplier (0 = frozen)
    int64_t steps = 0;
  };
  std::optional<TttState> ttt_;

  // Per-document LoRA adapters and their Adam state.
  struct LoraState {
    LoraOptimizerConfig opt;
    std::unique_ptr<LoraAdapters<float>> adapters;
    std::vector<float> exp_avg, exp_avg_sq;
    int64_t steps = 0;
  };
  std::optional<LoraState> lora_;
};

}  // namespace pgolf
