#include "bench_model.h"

#include <cuda_runtime.h>
#include <fmt/core.h>

#include <algorithm>
#include <vector>

#include "backend/cuda/check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/gpu_model.h"
#include "core/config.h"
#include "core/rng.h"
#include "backend/cuda/kernel_profile.h"

namespace pgolf::cuda {

namespace {

// Median of `reps` timed calls after 2 warm-ups (CUDA events on the model's stream).
template <typename F>
double median_ms(cudaStream_t stream, int reps, F&& step) {
  for (int i = 0; i < 2; ++i) step();
  cudaEvent_t start, stop;
  PG_CUDA_CHECK(cudaEventCreate(&start));
  PG_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(static_cast<size_t>(reps));
  for (float& m : ms) {
    PG_CUDA_CHECK(cudaEventRecord(start, stream));
    step();
    PG_CUDA_CHECK(cudaEventRecord(stop, stream));
    PG_CUDA_CHECK(cudaEventSynchronize(stop));
    PG_CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
  }
  PG_CUDA_CHECK(cudaEventDestroy(start));
  PG_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

void bench_model(const ModelBenchOptions& o) {
  const ModelConfig cfg = ModelConfig::from_config(Config::load(o.preset));
  PG_CHECK(o.tokens % o.seq == 0, "bench_cuda --model: --tokens {} is not a multiple of --seq {}", o.tokens, o.seq);
  // Random weights N(0, 0.02²): the timing does not depend on the init, but must not run on zeros
  // (the orthogonal init of the full-size matrices would also cost seconds of host time).
  ParamSet<float> params(ParamLayout(param_specs(cfg)));
  Rng rng(2);
  for (size_t i = 0; i < params.layout().size(); ++i)
    for (float& x : params[i]) x = static_cast<float>(0.02 * rng.normal());
  Batch batch;
  batch.rows = o.tokens / o.seq;
  batch.seq_len = o.seq;
  for (int i = 0; i < o.tokens; ++i) {
    batch.inputs.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(cfg.vocab_size))));
    batch.targets.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(cfg.vocab_size))));
  }

  size_t free_before = 0, total = 0;
  PG_CUDA_CHECK(cudaMemGetInfo(&free_before, &total));
  GpuModel model(cfg, GpuModelOptions{o.tokens});
  model.load_params(params);
  model.set_batch(batch);
  const cudaStream_t stream = model.stream();
  auto step = [&] {
    model.forward();
    model.backward();
  };
  const double fwd_ms = median_ms(stream, o.reps, [&] { model.forward(); });
  const double ms = median_ms(stream, o.reps, step);
  size_t free_after = 0;
  PG_CUDA_CHECK(cudaMemGetInfo(&free_after, &total));

  // MFU = tokens/s × (6·N + 6·L·d·T) / 989e12 (ENGINEERING §5), L = the layers the plan runs.
  const double n_params = static_cast<double>(params.layout().count());
  const double layers = model.num_virtual_layers();
  const double flops_per_token = 6.0 * n_params + 6.0 * layers * cfg.model_dim * o.seq;
  const double tokens_per_s = o.tokens / (ms * 1e-3);
  fmt::print("model {}: {} parameters, {} layers, {} tokens ({} x {})\n", o.preset, params.layout().count(),
             model.num_virtual_layers(), o.tokens, batch.rows, o.seq);
  fmt::print("model {} forward            {:9.2f} ms\n", o.preset, fwd_ms);
  fmt::print("model {} forward+backward   {:9.2f} ms  {:6.3f} M tokens/s  MFU {:5.1f} %\n", o.preset, ms,
             tokens_per_s * 1e-6, 100.0 * tokens_per_s * flops_per_token / 989e12);
  fmt::print("model {} device memory      {:9.2f} GiB in use by the model (arena {:.2f} GiB)\n", o.preset,
             static_cast<double>(free_before - free_after) / 1073741824.0,
             static_cast<double>(model.arena_bytes()) / 1073741824.0);

  if (!o.profile) return;
  KernelProfile profile;
  if (!profile.start()) {
    fmt::print("model {} kernel breakdown unavailable: {}\n", o.preset, profile.why());
    return;
  }
  const int reps = 3;
  for (int i = 0; i < reps; ++i) step();
  PG_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<KernelTime> kernels = profile.stop();
  double sum = 0;
  for (const KernelTime& k : kernels) sum += k.total_ms;
  fmt::print("kernel breakdown of forward+backward ({} kernels, {:.2f} ms per step of kernel time):\n",
             kernels.size(), sum / reps);
  for (size_t i = 0; i < kernels.size() && i < 15; ++i)
    fmt::print("  kernel {:<72} {:8.3f} ms {:5.1f} % {:6} calls/step\n", kernels[i].name, kernels[i].total_ms / reps,
               100.0 * kernels[i].total_ms / sum, kernels[i].calls / reps);
}

}  // namespace pgolf::cuda
