// The scalars of one GPU optimizer step, read by the step's kernels from device memory: the host
// writes OptimizerStepScalars before each step (or before each replay of a captured step), so a CUDA
// graph of the step stays valid while the learning rates, bias corrections and momentum change;
// GradClipState is written and read on the device only (no host round trip).
#pragma once

#include <cuda_runtime.h>

#include "optim/update_math.h"

namespace pgolf::cuda {

struct OptimizerStepScalars {
  optim::AdamCoeffs embed;   // token-embedding AdamW group: lr · lr_scale, bias corrections of step t
  optim::AdamCoeffs scalar;  // scalar AdamW group
  double muon_lr = 0.0;      // matrix_lr · lr_scale (double, as the CPU Muon forms its coefficients)
  float muon_decay = 1.0f;   // 1 − muon_lr · muon_wd, rounded to fp32
  float muon_momentum = 0.0f;
};

struct GradClipState {
  double norm = 0.0;         // global L2 norm of the gradients before clipping
  float coefficient = 1.0f;  // what every gradient is multiplied by (1 when clipping is off)
};

// *device ← value, stream-ordered: the value travels as a kernel argument, so the host neither waits
// for the stream nor keeps a staging buffer alive (a pageable cudaMemcpyAsync may do either).
void write_step_scalars(OptimizerStepScalars* device, const OptimizerStepScalars& value, cudaStream_t stream);

}  // namespace pgolf::cuda
