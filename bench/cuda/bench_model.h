// bench_cuda --model PRESET: one forward + backward of GpuModel on a full-size preset (random tokens,
// random weights), timed with CUDA events: ms, tokens/s, MFU (ENGINEERING §5),
// device memory, and with --profile the per-kernel time breakdown (CUPTI).
#pragma once

#include <string>

namespace pgolf::cuda {

struct ModelBenchOptions {
  std::string preset;
  int tokens = 98304;
  int seq = 2048;
  int reps = 10;
  bool profile = false;
};

void bench_model(const ModelBenchOptions& options);

}  // namespace pgolf::cuda
