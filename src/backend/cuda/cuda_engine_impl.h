// CudaEngine internals shared by cuda_engine.cpp (construction, state, training, evaluation) and
// cuda_engine_ttt.cpp (score-first TTT, LoRA, GPTQ Hessians). Not part of the interface.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/cuda_engine.h"
#include "backend/cuda/engine_steps.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/gpu_ema.h"
#include "backend/cuda/gpu_model.h"
#include "backend/cuda/gpu_optimizer.h"
#include "backend/cuda/grad_clip.h"
#include "backend/cuda/segment_copy.h"
#include "backend/cuda/step_graphs.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "model/lora.h"

namespace pgolf::cuda {

// What a step reads back to the host, in one pinned block (one copy each, one synchronisation).
struct StepReadBack {
  double loss_sum = 0.0;  // with several ranks: already their average
  GradClipState clip;
  double agree[2] = {0.0, 0.0};  // StepControl::agree_max, up and back (with several ranks: the maximum)
};

struct CudaEngine::Impl {
  Impl(const Config& config, Communicator& comm, const CudaEngineOptions& options);
  ~Impl();

  CudaEngineOptions options;
  Communicator& comm;
  GpuModel model;
  GpuOptimizer optimizer;  // clips by the global norm unless clipping is local
  GradClip local_clip;     // grad_clip_local or Parallel Muon: each rank's gradients, before the reduction
  // Parallel Muon: the replicated (non-bank) gradients packed for their one all-reduce.
  SegmentCopy replicated_to_buffer, buffer_to_replicated;
  DeviceBuffer<float> replicated_buffer;
  std::optional<GpuEma> ema;
  double ema_decay = 0.0;
  double grad_clip_norm = 0.0;
  bool grad_clip_local = false;
  bool qat = false;
  StepGraphs graphs;
  bool eval_overlap = true;  // cuda_eval_overlap: submitted evaluation calls run while the host goes on
  DeviceBuffer<double> loss_sum;  // Σ micro-batch mean losses of the current step (fp64, as the CPU engine)
  DeviceBuffer<double> step_agree;  // the step's StepControl::agree_max on its way through the reduction
  // Pinned, one block per pending training step (Engine::kMaxTrainPending); TTT uses the first.
  StepReadBack* readback = nullptr;
  // Pipelined training (Engine::submit_train_step): per pending step, the event after the copies into
  // its read-back block, and what its result needs; collected in submission order.
  struct TrainSlot {
    cudaEvent_t copied = nullptr;
    int64_t step = 0;
    int micro_batches = 0;
  };
  TrainSlot train_slots[Engine::kMaxTrainPending];
  int train_head = 0, train_pending = 0;

  // Score-first TTT over the base weights.
  struct Ttt {
    TttOptimizerConfig config;
    float multiplier[kTttClasses] = {0.f, 1.f, 1.f, 1.f};  // per class (0 = frozen)
    DeviceBuffer<uint8_t> classes;
    DeviceBuffer<float> buf1, buf2;  // SGD momentum / AdamW moments, layout order
    DeviceBuffer<TttStepScalars> scalars;
    std::unique_ptr<GradClip> clip;
    int64_t steps = 0;
  };
  std::optional<Ttt> ttt;

  // Per-document LoRA adapters: device adapters sized for the longest rows so far (grown, keeping the
  // parameters, by ensure_lora_adapters) and their Adam state.
  struct Lora {
    LoraConfig config;
    LoraOptimizerConfig opt;
    int64_t rows = 0;
    int slots = 0;
    int64_t total = 0;
    std::unique_ptr<GpuLora> adapters;  // created at the first batch (its width sizes them)
    uint64_t seed = 0;                   // lora_reset's draw, made on the device
    bool pending = false;                // the draw of `seed` is not in any adapters yet
    DeviceBuffer<float> exp_avg, exp_avg_sq;
    DeviceBuffer<optim::AdamCoeffs> coeffs;  // the current step's, read by the (captured) update
    int64_t steps = 0;
  };
  std::optional<Lora> lora;

  // Pipelined evaluation (Engine::submit_*): per pending call, the pinned block its NLL is copied
  // into behind its work, and the event after that copy; collected in submission order.
  struct ResultSlot {
    float* host = nullptr;
    size_t capacity = 0, n = 0;
    cudaEvent_t copied = nullptr;
  };
  ResultSlot results[Engine::kMaxPending];
  int results_head = 0, results_pending = 0;
  ResultSlot& open_result(size_t n);  // the next slot, holding n values; counted pending by close_result
  void close_result();

  // GPTQ calibration: Gram matrices XᵀX in fp32 (lazily allocated).
  std::unique_ptr<GemmRunner> gram_gemm;
  DeviceBuffer<float> gram;

  cudaStream_t stream() const { return model.stream(); }
  // Whether the gradient norm (and the clip) is each rank's local one, measured before the reduction:
  // grad_clip_local, or Parallel Muon, under which no rank ever holds the averaged bank gradients.
  bool clips_locally() const { return grad_clip_local || optimizer.parallel_muon(); }
  // Graph key of a batch: everything set_batch hands to the launches as host values.
  std::string shape_key(const Batch& b) const;
  // Copies `n` readback bytes from device `src` into the pinned block at `dst` (stream-ordered).
  void read_back(void* dst, const void* src, size_t n);
  void synchronize();
  // The training step's parts (cuda_engine.cpp): one micro-batch's forward + backward, the update.
  void enqueue_micro(bool first);
  void enqueue_update(int micro_batches, bool update_ema);
  std::string update_mode(bool update_ema) const;
  void begin_update(const StepControl& control);  // outside the graph: fresh weights, optimizer scalars
  // The step's one read-back into the next training slot, behind its work; then the result of the
  // oldest pending step (its wait, its checks, the loss averaged across ranks).
  void submit_readback(const StepControl& control, int micro_batches);
  StepResult collect_step();
  // Calls other than the next step's submission and mode switches wait for no training step.
  void require_no_pending_steps(const char* call) const {
    PG_CHECK(train_pending == 0, "{}: {} submitted training steps are not collected yet", call, train_pending);
  }
  // Calls fn on `batch`, or, when it has more than max_tokens tokens, on the pieces of split_batch
  // (forward-only work: rows and segments are independent).
  void for_each_row_chunk(const Batch& batch, const std::function<void(const Batch&)>& fn) const;
  void ensure_lora_adapters(int64_t seq_len);
  // One LoRA TTT engine call: forward (per-token losses copied to nll when given), then, with token
  // weights, the adapters' backward and AdamW step over the batch's rows; a CUDA graph per shape.
  // `nll`: a pinned block the per-token losses are copied into, stream-ordered (or null).
  void lora_step(const Batch& batch, std::span<const float> token_weights, float* nll);
  std::vector<float> gram_of(const __nv_bfloat16* x, int64_t rows, int cols);
};

}  // namespace pgolf::cuda
