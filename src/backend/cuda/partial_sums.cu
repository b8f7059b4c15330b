#include <string>

#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {
namespace {

struct Targets {
  float* dst[kMaxSumTargets];
  int end[kMaxSumTargets];  // exclusive end column of each target
  int count;
};

constexpr int kFinishThreads = 256;

// A block sums `columns` adjacent columns (a power of two, at most 32) with kFinishThreads / columns
// slices of threads per column: slice s adds the partial rows s, s + slices, s + 2·slices, ... in that
// order, then the slices are added pairwise in a fixed tree. The order depends on the sizes only, so
// the sums are the same bits on every run; the slices keep many loads in flight (a single thread
// walking all the blocks' rows was bound by the latency of its dependent loads).
__global__ void __launch_bounds__(kFinishThreads)
    finish_partial_sums_kernel(const float* __restrict__ partials, int blocks, int width, int columns,
                               const Targets t) {
  pdl_prologue();
  __shared__ float slice_sums[kFinishThreads];
  const int lane = threadIdx.x % columns, slice = threadIdx.x / columns, slices = kFinishThreads / columns;
  const int c = blockIdx.x * columns + lane;
  float s = 0.f;
  if (c < width) {
#pragma unroll 8
    for (int b = slice; b < blocks; b += slices) s += partials[static_cast<size_t>(b) * width + c];
  }
  slice_sums[threadIdx.x] = s;  // = [slice][lane]
  __syncthreads();
  for (int half = slices / 2; half > 0; half /= 2) {
    if (slice < half) slice_sums[threadIdx.x] += slice_sums[threadIdx.x + half * columns];
    __syncthreads();
  }
  if (slice != 0 || c >= width) return;
  // The first target whose columns end past c (unrolled: constant indices keep Targets out of local memory).
  float* dst = nullptr;
  int begin = 0;
#pragma unroll
  for (int i = kMaxSumTargets - 1; i >= 0; --i)
    if (i < t.count && c < t.end[i]) dst = t.dst[i], begin = i > 0 ? t.end[i - 1] : 0;
  if (dst != nullptr) dst[c - begin] += slice_sums[lane];
}

}  // namespace

void check_reduce_workspace(const ReduceWorkspace& ws, int blocks, int width, const char* what) {
  if (ws.data != nullptr && ws.floats >= static_cast<size_t>(blocks) * width) return;
  std::string msg = std::string(what) + ": the reduction workspace holds " + std::to_string(ws.floats) +
                    " floats, " + std::to_string(static_cast<size_t>(blocks) * width) + " are needed";
  raise_error(msg.c_str(), __FILE__, __LINE__);
}

void finish_partial_sums(const float* partials, int blocks, std::initializer_list<SumTarget> targets,
                         cudaStream_t stream) {
  PG_CUDA_REQUIRE(targets.size() <= static_cast<size_t>(kMaxSumTargets), "finish_partial_sums: too many targets");
  Targets t{};
  int width = 0;
  bool any = false;
  for (const SumTarget& target : targets) {
    t.dst[t.count] = target.dst;
    width += target.width;
    t.end[t.count++] = width;
    any = any || target.dst != nullptr;
  }
  if (!any || width == 0) return;
  int columns = 1;  // columns per block: the power of two ≥ width, at most 32
  while (columns < width && columns < 32) columns *= 2;
  launch_kernel(finish_partial_sums_kernel, (width + columns - 1) / columns, kFinishThreads, 0, stream, partials,
                blocks, width, columns, t);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
