#include <string>

#include "backend/cuda/check.h"
#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {
namespace {

struct Targets {
  float* dst[kMaxSumTargets];
  int end[kMaxSumTargets];  // exclusive end column of each target
  int count;
};

// One thread per column: the sum over the blocks' partial rows, in block order.
__global__ void finish_partial_sums_kernel(const float* __restrict__ partials, int blocks, int width,
                                           const Targets t) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  int q = 0, begin = 0;
  while (c >= t.end[q]) begin = t.end[q++];
  if (t.dst[q] == nullptr) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += partials[static_cast<size_t>(b) * width + c];
  t.dst[q][c - begin] += s;
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
  const int threads = 128;
  finish_partial_sums_kernel<<<(width + threads - 1) / threads, threads, 0, stream>>>(partials, blocks, width, t);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
