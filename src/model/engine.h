// Engine: what training and evaluation need from a model backend — the CPU reference (CpuEngine,
// fp32) or the CUDA engine. One engine per rank. Parameters and gradients are fp32 in ParamLayout
// order; host copies move through ParamSet<float>. The engine owns the training optimizer (so the
// whole step can run on the device and be captured as one CUDA graph), the EMA copy, and the
// auxiliary optimizers of test-time training. Distributed reductions go through the Communicator
// given at construction (host buffers for the CPU engine, device buffers for NCCL).
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/lora.h"
#include "model/params.h"

namespace pgolf {

class Communicator;

// Controls of one optimizer step, computed by the trainer from its schedules (optim/schedule.h).
struct StepControl {
  int64_t step = 0;            // optimizer steps taken before this one
  double lr_scale = 1.0;       // schedule multiplier of every group's LR
  double muon_momentum = 0.95;
  bool update_ema = false;     // fold the new weights into the EMA (decay from the preset) after the step
  // Host values the ranks agree on with the step: their maximum over the ranks comes back in
  // StepResult::agreed, reduced in order with the step's own work (the trainer's stop-rule flags, so
  // that no host collective has to wait behind a step submitted ahead; see submit_train_step).
  std::array<double, 2> agree_max{0.0, 0.0};
};

struct StepResult {
  double loss = 0.0;       // mean training loss of the step (micro-batches averaged, then ranks averaged)
  double grad_norm = 0.0;  // global L2 norm before clipping (the local one when clipping is local or under Parallel Muon)
  std::array<double, 2> agreed{0.0, 0.0};  // StepControl::agree_max, the maximum over the ranks
};

// Optimizer of score-first TTT over the base weights (SPEC §6.3 / §6.4 / §6.7).
struct TttOptimizerConfig {
  enum class Kind { Sgd, AdamW } kind = Kind::Sgd;
  double lr = 0.002;            // base LR; ttt_step's lr_scale multiplies it (cosine schedules)
  double momentum = 0.9;        // SGD
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;  // AdamW
  double proj_lr_mult = 1.0;    // AdamW per-group LRs (s562): names containing ".proj." ...
  double fc_lr_mult = 1.0;      // ... and ".fc."
  double grad_clip = 1.0;       // global L2 clip (0 = off)
  int freeze_blocks = 0;        // blocks 0..k-1 (and nothing else) stay frozen
};

// Optimizer of the per-document LoRA adapters (SPEC §6.5).
struct LoraOptimizerConfig {
  double lr = 0.01;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-10, weight_decay = 0.0;  // Adam (wd 0) or AdamW
};

class Engine {
 public:
  virtual ~Engine() = default;

  virtual const ModelConfig& model_config() const = 0;
  virtual const ParamLayout& layout() const = 0;
  virtual const char* backend_name() const = 0;  // "cpu" or "cuda"

  // ---- parameters and state -------------------------------------------------------------------
  virtual void load_params(const ParamSet<float>& params) = 0;   // host -> engine (also resets nothing else)
  virtual void store_params(ParamSet<float>& params) const = 0;  // engine -> host
  // Optimizer moments, step counter and EMA copy under the names of optim/ (optim/<p>/..., ema/<p>).
  virtual TensorMap optimizer_state() const = 0;
  virtual void load_optimizer_state(const TensorMap& state, const std::string& what) = 0;
  virtual void init_ema() = 0;                          // EMA := current weights
  virtual void store_ema(ParamSet<float>& out) const = 0;  // the EMA weights (host)

  // ---- modes ----------------------------------------------------------------------------------
  virtual void set_looping(bool on) = 0;  // s1560 depth recurrence (layer plan)
  virtual void set_qat(bool on) = 0;      // late-QAT fake quantization in training forwards

  // ---- training -------------------------------------------------------------------------------
  // One optimizer step over the micro-batches of this rank (gradient accumulation: each micro-batch's
  // mean loss weighted by 1/n): zero grads, forward + backward each, average the gradients across
  // ranks, clip (global or local as the preset says), the optimizer groups, then the EMA.
  virtual StepResult train_step(std::span<const Batch> micro_batches, const StepControl& control) = 0;

  // Pipelined training: the trainer submits step k + 1 before it waits for step k, so that its host
  // work between steps (the next batch, the upload, the launch, the logs) overlaps the device's work
  // instead of leaving the device idle. Results come back in submission order; at most
  // kMaxTrainPending steps wait to be collected, and no other call may come between a submission and
  // the collection of every pending step except the set_looping / set_qat of the next step (they apply
  // to steps submitted after them). submit_train_step + collect_train_step is train_step: the same
  // work, the same result. The defaults run the step at submission (the CPU engine); the CUDA engine
  // enqueues it and copies its loss and gradient norm back into pinned memory behind it. With several
  // ranks, the collection makes no collective of its own: the loss average and agree_max are reduced
  // on the device behind the step's work (a host collective on the engine's stream would wait behind
  // the step submitted after it).
  static constexpr int kMaxTrainPending = 2;
  virtual void submit_train_step(std::span<const Batch> micro_batches, const StepControl& control);
  virtual StepResult collect_train_step();  // the result of the oldest pending step
  virtual int train_steps_pending() const { return static_cast<int>(completed_steps_.size()); }

  // ---- evaluation -----------------------------------------------------------------------------
  // Eval-mode forward: the per-token NLL (natural log, fp32) of every position of the batch, [tokens].
  // With batch.losses_from set only the positions it names are guaranteed; the others may hold
  // anything (the CUDA engine leaves NaN there).
  virtual void token_losses(const Batch& batch, std::vector<float>& nll) = 0;

  // ---- score-first TTT over the base weights --------------------------------------------------
  virtual void ttt_begin(const TttOptimizerConfig& config) = 0;  // fresh optimizer state
  // Train-mode forward + backward of the batch's mean loss, gradients averaged across ranks, clipped,
  // one step at lr · lr_scale. Returns the loss (this rank's).
  virtual double ttt_step(const Batch& batch, double lr_scale) = 0;
  virtual void ttt_end() = 0;  // frees the TTT optimizer state

  // ---- per-document LoRA TTT (SPEC §6.5) ------------------------------------------------------
  // Adapters for `rows` documents per batch, one set per virtual layer of the current plan. A batch
  // may have fewer rows (the documents that still have chunks): its row b uses adapter b, and its
  // optimizer step moves only the adapters of its rows (the other rows keep values and moments).
  virtual void lora_begin(const LoraConfig& lora, int64_t rows, const LoraOptimizerConfig& opt) = 0;
  virtual void lora_reset(uint64_t seed) = 0;  // re-draw A, zero B, zero the optimizer state
  // Forward with the adapters (base frozen): per-token NLL of the batch into `nll` [tokens]; then,
  // when `token_weights` is non-empty, backward of Σ w_i·nll_i into the adapters and one optimizer step.
  // With batch.losses_from set only the positions it names are guaranteed (as token_losses), and the
  // token weights must be 0 at the others.
  virtual void lora_score_and_train(const Batch& batch, std::span<const float> token_weights,
                                    std::vector<float>& nll) = 0;
  // One more optimizer step on the same batch with a fresh forward (several steps per chunk, s600's plan).
  virtual void lora_train_step(const Batch& batch, std::span<const float> token_weights) = 0;
  virtual void lora_end() = 0;

  // ---- pipelined evaluation -------------------------------------------------------------------
  // The evaluation loops overlap their host work (the next batch, the scoring of the last) with the
  // engine's: a call is submitted, the loop prepares the next one and submits it, then collects the
  // per-token NLL of the earlier call. Results come back in submission order; at most kMaxPending
  // calls wait to be collected. submit_token_losses is token_losses, submit_lora is
  // lora_score_and_train, in two halves: the same work and the same NLL. The defaults run the call
  // when it is submitted and keep its NLL; the CUDA engine enqueues the work and copies the NLL back
  // into pinned memory behind it. The synchronous calls above need no pending call.
  static constexpr int kMaxPending = 2;
  virtual void submit_token_losses(const Batch& batch);
  virtual void submit_lora(const Batch& batch, std::span<const float> token_weights);
  virtual void collect(std::vector<float>& nll);  // the NLL of the oldest pending call
  virtual int pending() const { return static_cast<int>(completed_.size()); }

  // ---- GPTQ calibration (SPEC §5.7) -----------------------------------------------------------
  // Eval-mode forward of `batch` with the current layer plan; for every quantized matrix adds XᵀX of
  // its input rows to hessians[<unbanked weight name>] (F32 [in, in], created on first use; looped
  // layers add once per pass) and, for "tok_emb.weight" (the tied head), XᵀX of the final-norm
  // output. The caller divides by the number of batches.
  virtual void accumulate_hessians(const Batch& batch, TensorMap& hessians) = 0;

 private:
  std::deque<std::vector<float>> completed_;  // the default pipeline: NLL of calls run at submission
  std::deque<StepResult> completed_steps_;     // ... and the results of steps run at submission
};

// Collects, and drops, the calls (and training steps) still pending when a pipelined loop is left by
// an exception, so the engine can take synchronous calls again.
class PendingCalls {
 public:
  explicit PendingCalls(Engine& engine) : engine_(engine) {}
  PendingCalls(const PendingCalls&) = delete;
  PendingCalls& operator=(const PendingCalls&) = delete;
  ~PendingCalls() {
    std::vector<float> dropped;
    try {
      while (engine_.pending() > 0) engine_.collect(dropped);
    } catch (...) {  // the error that left the loop is the one to report
    }
    while (engine_.train_steps_pending() > 0) {
      try {
        engine_.collect_train_step();
      } catch (...) {  // a step whose result fails its check is collected all the same
      }
    }
  }

 private:
  Engine& engine_;
};

}  // namespace pgolf
