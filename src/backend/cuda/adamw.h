// Multi-tensor AdamW on the device (SPEC §4.3), the twin of optim/adam.h: one launch steps every
// tensor of the token-embedding and scalar groups. The host cuts the tensors into chunks of at most
// kChunkElems values; block b steps chunk b with its group's coefficients from the step scalars.
// Moments are fp32 arrays holding only the group members, in ParamLayout order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/step_scalars.h"

namespace pgolf::cuda {

enum class AdamGroup : int32_t { kEmbed = 0, kScalar = 1 };

// One tensor of an AdamW group: where it lives in the parameter / gradient arrays.
struct AdamTensor {
  int64_t param_offset = 0;
  int64_t numel = 0;
  AdamGroup group = AdamGroup::kEmbed;
};

// A piece of one tensor stepped by one block.
struct AdamChunk {
  int64_t param_offset;  // first value in params / grads
  int64_t state_offset;  // first value in exp_avg / exp_avg_sq
  int32_t length;
  AdamGroup group;
};

class MultiTensorAdamW {
 public:
  static constexpr int32_t kChunkElems = 4096;

  explicit MultiTensorAdamW(const std::vector<AdamTensor>& tensors);

  // params (and the moments) ← one AdamW step with grads · clip->coefficient and the coefficients of
  // `scalars` (device pointers; no host synchronisation).
  void enqueue(float* params, const float* grads, const OptimizerStepScalars* scalars, const GradClipState* clip,
               cudaStream_t stream);

  size_t tensor_count() const { return state_offsets_.size(); }
  int64_t state_offset(size_t k) const { return state_offsets_[k]; }  // tensor k's moments start here
  int64_t state_size() const { return state_size_; }
  float* exp_avg() { return exp_avg_.data(); }
  float* exp_avg_sq() { return exp_avg_sq_.data(); }
  const float* exp_avg() const { return exp_avg_.data(); }
  const float* exp_avg_sq() const { return exp_avg_sq_.data(); }

 private:
  std::vector<int64_t> state_offsets_;
  int64_t state_size_ = 0;
  DeviceBuffer<AdamChunk> chunks_;
  DeviceBuffer<float> exp_avg_, exp_avg_sq_;
};

}  // namespace pgolf::cuda
