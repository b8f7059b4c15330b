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

namespace pgolf::cuda {

class GpuOptimizer {
 public:
  // grad_clip_norm > 0: each step first clips the gradients by their global L2 norm (grad_clip_norm
  // of the preset); <= 0: no clipping.
  GpuOptimizer(const ParamLayout& layout, const optim::OptimizerConfig& config, double grad_clip_norm);

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

  // Synchronize the device, then copy the state to / from host tensors.
  TensorMap state_tensors() const;
  void load_state_tensors(const TensorMap& t, const std::string& what);

  const ParamLayout& layout() const { return layout_; }
  // The parts, for the benchmark's breakdown.
  GradClip& clip() { return clip_; }
  MultiTensorAdamW& adamw() { return adamw_; }
  GpuMuon& muon() { return muon_; }
  const OptimizerStepScalars* device_scalars() const { return scalars_.data(); }

 private:
  ParamLayout layout_;
  optim::OptimizerConfig config_;
  std::vector<size_t> adam_members_;  // Embed and Scalar groups, in layout order
  std::vector<size_t> muon_members_;  // Matrix group, in layout order
  GradClip clip_;
  MultiTensorAdamW adamw_;
  GpuMuon muon_;
  DeviceBuffer<OptimizerStepScalars> scalars_;
  int64_t steps_taken_ = 0;
};

}  // namespace pgolf::cuda
