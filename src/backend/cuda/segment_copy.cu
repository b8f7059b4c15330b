#include "backend/cuda/segment_copy.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename Dst>
__device__ __forceinline__ Dst to(float x);
template <>
__device__ __forceinline__ float to<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 to<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One thread per value: the run holding flat index i (binary search over the runs' `begin`).
template <typename Src, typename Dst>
__global__ void __launch_bounds__(kThreads)
    copy_runs(const Src* __restrict__ src, Dst* __restrict__ dst, const DeviceCopyRun* __restrict__ runs,
              int run_count, int64_t values) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < values;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    int lo = 0, hi = run_count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (runs[mid].begin <= i)
        lo = mid;
      else
        hi = mid - 1;
    }
    const DeviceCopyRun r = runs[lo];
    const int64_t k = i - r.begin;
    dst[r.to + k] = to<Dst>(as_float(src[r.from + k]));
  }
}

}  // namespace

SegmentCopy::SegmentCopy(const std::vector<optim::CopyRun>& runs, const char* what) {
  std::vector<DeviceCopyRun> table;
  for (const optim::CopyRun& r : runs) {
    PG_CUDA_REQUIRE(r.count >= 0 && r.from >= 0 && r.to >= 0, "SegmentCopy: a run with a negative offset or count");
    if (r.count == 0) continue;
    table.push_back(DeviceCopyRun{r.from, r.to, r.count, values_});
    values_ += r.count;
  }
  run_count_ = static_cast<int>(table.size());
  if (!table.empty()) runs_ = DeviceBuffer<DeviceCopyRun>(table, what);
}

template <typename Src, typename Dst>
void SegmentCopy::launch(const Src* src, Dst* dst, cudaStream_t stream) const {
  if (values_ == 0) return;
  const int64_t blocks = (values_ + kThreads - 1) / kThreads;
  copy_runs<<<static_cast<unsigned>(blocks < 8192 ? blocks : 8192), kThreads, 0, stream>>>(
      src, dst, runs_.data(), run_count_, values_);
  PG_CUDA_LAUNCH_CHECK();
}

void SegmentCopy::enqueue(const float* src, float* dst, cudaStream_t stream) const { launch(src, dst, stream); }
void SegmentCopy::enqueue(const float* src, __nv_bfloat16* dst, cudaStream_t stream) const {
  launch(src, dst, stream);
}
void SegmentCopy::enqueue(const __nv_bfloat16* src, __nv_bfloat16* dst, cudaStream_t stream) const {
  launch(src, dst, stream);
}

}  // namespace pgolf::cuda
