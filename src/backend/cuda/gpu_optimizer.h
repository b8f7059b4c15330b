// GpuOptimizer: the training run's optimizer step on the device, the twin of optim::Optimizer. It
// owns the state (AdamW moments and Muon momentum, on the device) and steps fp32 parameters with fp32
// gradients, both device arrays in ParamLayout order:
//
//   clip (optional) → AdamW over the Embed and Scalar groups (one launch) → Muon (five phases)
//
// with no host synchronisation, so enqueue_step() can be captured into a CUDA graph. What changes from
// step to step is written by begin_step() into a device struct the kernels read (step_scalars.h):
//
//   opt.begin_step(k, lr_scale, momentum, stream);   // outside the graph
//   cudaGraphLaunch(step_graph, stream);             // captured once from opt.enqueue_step(...)
//
// The state saves and loads under the CPU Optimizer's names (optim/<param>/{exp_avg, exp_avg_sq,
// momentum_buffer}, optim/step), so checkpoints move between the two. Newton–Schulz runs in bf16
// (muon_ns_dtype = "bf16", the references' precision); fp32 Muon is CPU-only.
//
// Given a communicator of several ranks (device buffers) and a stack with 3-D banks, the banks run
// Parallel Muon as the CPU Optimizer does (optim/muon.h, SPEC §4.2): the step reduce-scatters their
// local gradients (bf16, Avg, one collective for all banks), orthogonalises this rank's slices and
// all-gathers the updates (one collective); every other gradient must be averaged by the caller.
// The collectives are enqueued on the communicator's stream, which must be the step's stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "backend/cuda/adamw.h"
#include "backend/cuda/grad_clip.h"
#include "backend/cuda/muon.h"
#include "backend/cuda/step_scalars.h"
#include "core/tensor.h"
#include "model/params.h"
#include "optim/optimizer.h"
#include "optim/parallel_muon_plan.h"

namespace pgolf {
class Communicator;
}

namespace pgolf::cuda {

class GpuOptimizer {
 public:
  // grad_clip_norm > 0: each step first clips the gradients by their global L2 norm (grad_clip_norm
  // of the preset); <= 0: no clipping. `comm` (outliving the optimizer): the ranks of Parallel Muon,
  // which clips nothing here (the caller clips each rank's local gradients, as the references do).
  GpuOptimizer(const ParamLayout& layout, const optim::OptimizerConfig& config, double grad_clip_norm,
               Communicator* comm = nullptr);

  // Host part of a step: checks `step_index` against the steps taken (as the CPU Optimizer does) and
  // writes the step's scalars (lr = base · lr_scale, bias corrections, Muon μ) on `stream`.
  void begin_step(int64_t step_index, double lr_scale, double momentum, cudaStream_t stream);
  // Device part: params (fp32, layout().total() values) ← one step with grads (not modified; clipping
  // is applied as the kernels read them). Stream-ordered, no host synchronisation; capturable.
  void enqueue_step(float* params, const float* grads, cudaStream_t stream);
  // Both.
  void step(float* params, const float* grads, int64_t step_index, double lr_scale, double momentum,
            cudaStream_t stream);

  int64_t steps_taken() const { return steps_taken_; }
  // The last step's gradient norm before clipping (synchronizes `stream`; throws when not finite).
  double grad_norm(cudaStream_t stream) const { return clip_.norm(stream); }

  // Synchronize the device, then copy the state to / from host tensors. Under Parallel Muon saving
  // first gathers the bank momenta from their owners (a collective: every rank calls it, `stream`
  // being the communicator's), so every rank returns the whole state, the one-rank tensors.
  TensorMap state_tensors(cudaStream_t stream = nullptr);
  void load_state_tensors(const TensorMap& t, const std::string& what);
  bool parallel_muon() const { return muon_.sharded(); }
  const optim::ParallelMuonPlan& parallel_muon_plan() const { return plan_; }

  const ParamLayout& layout() const { return layout_; }
  // The parts, for the benchmark's breakdown.
  GradClip& clip() { return clip_; }
  MultiTensorAdamW& adamw() { return adamw_; }
  GpuMuon& muon() { return muon_; }
  const OptimizerStepScalars* device_scalars() const { return scalars_.data(); }

 private:
  ParamLayout layout_;
  optim::OptimizerConfig config_;
  Communicator* comm_;
  optim::ParallelMuonPlan plan_;
  std::vector<size_t> adam_members_;  // Embed and Scalar groups, in layout order
  std::vector<size_t> muon_members_;  // Matrix group, in layout order
  GradClip clip_;
  MultiTensorAdamW adamw_;
  GpuMuon muon_;
  DeviceBuffer<OptimizerStepScalars> scalars_;
  int64_t steps_taken_ = 0;
};

}  // namespace pgolf::cuda
