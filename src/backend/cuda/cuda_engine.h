// CudaEngine: the Engine on the GPU (GpuModel + GpuOptimizer + GpuEma), with CpuEngine's semantics
// (train/cpu_engine.cpp is the behavioural reference): accumulation scaling, rank averaging of the
// flat gradient buffer through the Communicator (one call, device pointers; banked stacks on several
// ranks run Parallel Muon instead, gpu_optimizer.h), local or global clipping, EMA, the optimizer state under optim/'s names, score-first TTT (SGD / AdamW with
// per-group learning rates and frozen blocks), per-document LoRA adapters with Adam, GPTQ Hessians.
//
// A training step of one micro-batch is, in steady state: the batch's asynchronous upload (pinned
// staging), the optimizer's per-step scalars, one CUDA graph replay of
//   zero grads → forward → backward → (rank reduction) → clip → AdamW + Muon → EMA → bf16 weight refresh
// and one read-back of the loss and the gradient norm (the step's only synchronisation). With n
// micro-batches: n forward + backward replays, then one update replay. Mode changes (looping, late
// QAT, EMA on or off, another batch shape) select or capture another graph (step_graphs.h).
//
// Batches larger than max_tokens are evaluated (token_losses, accumulate_hessians) in pieces of
// split_batch (whole rows, or a long row of segments cut at segment ends); training, TTT and LoRA
// batches must fit.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "backend/cuda/step_graphs.h"
#include "core/config.h"
#include "model/engine.h"

namespace pgolf::cuda {

class GpuModel;

struct CudaEngineOptions {
  int64_t max_tokens = 0;      // the largest forward (rows · seq_len); must be positive
  bool deterministic = false;  // bit-reproducible gradients: no atomics in the backward (slower)
  bool graphs = true;          // capture steps as CUDA graphs (false: launch eagerly)
};

class CudaEngine final : public Engine {
 public:
  // `comm` must outlive the engine; with more than one rank it must reduce device buffers (NCCL, or
  // the thread device communicator of the tests, under which steps are not captured into graphs).
  CudaEngine(const Config& config, Communicator& comm, const CudaEngineOptions& options);
  ~CudaEngine() override;
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  const ModelConfig& model_config() const override;
  const ParamLayout& layout() const override;
  const char* backend_name() const override { return "cuda"; }

  void load_params(const ParamSet<float>& params) override;
  void store_params(ParamSet<float>& params) const override;
  TensorMap optimizer_state() const override;
  void load_optimizer_state(const TensorMap& state, const std::string& what) override;
  void init_ema() override;
  void store_ema(ParamSet<float>& out) const override;

  void set_looping(bool on) override;
  void set_qat(bool on) override;

  StepResult train_step(std::span<const Batch> micro_batches, const StepControl& control) override;
  void submit_train_step(std::span<const Batch> micro_batches, const StepControl& control) override;
  StepResult collect_train_step() override;
  int train_steps_pending() const override;
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

  void submit_token_losses(const Batch& batch) override;
  void submit_lora(const Batch& batch, std::span<const float> token_weights) override;
  void collect(std::vector<float>& nll) override;
  int pending() const override;

  void accumulate_hessians(const Batch& batch, TensorMap& hessians) override;

  // One optimizer step (clip, reduction, AdamW + Muon, EMA, bf16 refresh: a training step's update
  // graph) on the gradients of the last backward, alone — for benchmarks; `loss` is that of the last
  // forward.
  StepResult optimizer_step(const StepControl& control);

  // For benchmarks and tests.
  GpuModel& model();
  const CudaEngineOptions& options() const;
  size_t graphs_captured() const;
  // Host-side work of the model's steps so far: graph calls (eager, captured, replayed) and GEMM plans.
  struct HostCounters {
    StepGraphStats graphs;
    size_t gemm_plans = 0;
    double gemm_plan_seconds = 0.0;
  };
  HostCounters host_counters() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pgolf::cuda
