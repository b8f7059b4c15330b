// GpuEma: the EMA of the parameters on the device (SPEC §4.6), the twin of optim::Ema, with the same
// checkpoint tensors (ema/<param>).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "backend/cuda/arena.h"
#include "core/tensor.h"
#include "model/params.h"

namespace pgolf::cuda {

class GpuEma {
 public:
  // Starts from the initial parameters (device, layout.total() values); synchronous copy.
  GpuEma(const ParamLayout& layout, const float* initial_params, double decay);

  // ema ← d·ema + (1 − d)·θ after an optimizer step (stream-ordered; capturable).
  void update(const float* params, cudaStream_t stream);
  // params ← ema (stream-ordered), at the end of training.
  void copy_to(float* params, cudaStream_t stream) const;
  const float* average() const { return average_.data(); }
  double decay() const { return decay_; }

  // Synchronize the device, then copy to / from "ema/<param>" tensors (optim::Ema's names).
  TensorMap state_tensors() const;
  void load_state_tensors(const TensorMap& t, const std::string& what);

 private:
  ParamLayout layout_;
  DeviceBuffer<float> average_;
  double decay_;
};

}  // namespace pgolf::cuda
