// Gradient clipping by the global L2 norm (SPEC §4.5) on the device, the twin of optim/clip.h: a
// two-stage reduction (fixed partial sums in fp64, then one block in a fixed order, so the norm's
// bits do not depend on scheduling) into a GradClipState that the optimizer kernels read. The
// gradients are not rewritten: every consumer multiplies by the coefficient as it loads them, which
// gives the bits of the CPU's `grads *= coef` without another pass over memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/arena.h"
#include "backend/cuda/step_scalars.h"

namespace pgolf::cuda {

class GradClip {
 public:
  // `max_norm` <= 0: clipping is off (the coefficient stays 1); the norm is still measured.
  explicit GradClip(double max_norm);

  // state ← (‖grads‖₂, min(1, max_norm / (‖grads‖₂ + 1e-6)), or 1 when clipping is off). `grads`
  // 16-byte aligned, `count` values.
  void enqueue(const float* grads, int64_t count, cudaStream_t stream);

  const GradClipState* state() const { return state_.data(); }
  bool enabled() const { return max_norm_ > 0.0; }
  // The last norm (synchronizes with `stream`); throws when it is not finite (a NaN or infinite gradient).
  double norm(cudaStream_t stream) const;
  // The state's norm as read back without synchronizing by a caller that batches its reads (throws as norm()).
  static double checked_norm(const GradClipState& host);

 private:
  double max_norm_;
  DeviceBuffer<double> partials_;
  DeviceBuffer<GradClipState> state_;
};

}  // namespace pgolf::cuda
