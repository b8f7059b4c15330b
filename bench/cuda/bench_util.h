// Shared by the bench_cuda sections: a CUDA-event timer (warm-up, then the median of the repeats)
// and the result table's row format.
#pragma once

#include <cuda_runtime.h>
#include <fmt/core.h>

#include <algorithm>
#include <string>
#include <vector>

#include "backend/cuda/check.h"

namespace pgolf::cuda {

struct Timer {
  cudaStream_t stream;
  int reps;
  template <typename F>
  double median_ms(F&& launch) const {
    for (int i = 0; i < 3; ++i) launch();
    cudaEvent_t start, stop;
    PG_CUDA_CHECK(cudaEventCreate(&start));
    PG_CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; ++i) {
      PG_CUDA_CHECK(cudaEventRecord(start, stream));
      launch();
      PG_CUDA_CHECK(cudaEventRecord(stop, stream));
      PG_CUDA_CHECK(cudaEventSynchronize(stop));
      PG_CUDA_CHECK(cudaEventElapsedTime(&ms[i], start, stop));
    }
    PG_CUDA_CHECK(cudaEventDestroy(start));
    PG_CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

// name, shape, milliseconds and TFLOP/s ("-" for work that is not counted in FLOPs).
inline void row(const std::string& name, const std::string& shape, double ms, double flops) {
  if (flops > 0)
    fmt::print("{:<34} {:<34} {:>9.3f} {:>9.1f}\n", name, shape, ms, flops / (ms * 1e-3) / 1e12);
  else
    fmt::print("{:<34} {:<34} {:>9.3f} {:>9}\n", name, shape, ms, "-");
}

// The optimizer step of the s691 and s1560 layouts and its parts (bench_optimizer.cpp).
void bench_optimizer(const Timer& timer);

}  // namespace pgolf::cuda
