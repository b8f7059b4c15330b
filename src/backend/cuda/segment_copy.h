// Copies of many runs of values between two device arrays in one launch (the packing of Parallel
// Muon's collectives, optim/parallel_muon_plan.h): dst[run.to + i] = src[run.from + i] for every run
// and i < run.count, converted to the destination's type (fp32 → bf16 rounds to nearest even).
// Stream-ordered and capturable.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/arena.h"
#include "optim/parallel_muon_plan.h"

namespace pgolf::cuda {

// A run on the device, with the number of values of the runs before it.
struct DeviceCopyRun {
  int64_t from, to, count, begin;
};

class SegmentCopy {
 public:
  SegmentCopy() = default;
  SegmentCopy(const std::vector<optim::CopyRun>& runs, const char* what);

  void enqueue(const float* src, float* dst, cudaStream_t stream) const;
  void enqueue(const float* src, __nv_bfloat16* dst, cudaStream_t stream) const;
  void enqueue(const __nv_bfloat16* src, __nv_bfloat16* dst, cudaStream_t stream) const;

  int64_t values() const { return values_; }  // Σ run.count

 private:
  template <typename Src, typename Dst>
  void launch(const Src* src, Dst* dst, cudaStream_t stream) const;

  DeviceBuffer<DeviceCopyRun> runs_;
  int run_count_ = 0;
  int64_t values_ = 0;
};

}  // namespace pgolf::cuda
