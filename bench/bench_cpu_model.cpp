// CPU model throughput: forward + backward tokens/s in fp32 for small models (CPU training demos).
//   build/pgolf_microbench --benchmark_filter=CpuModel
// Arguments: model_dim, layers, sequence length; batch = 4 rows; vocab 1024; head_dim 64 (H = d/64,
// Hkv = H/2 when H > 1); baseline stack (relu², MLP 2x) and the s1560 stack (looping, lanes, MLP 4x).
#include <benchmark/benchmark.h>

#include "core/config.h"
#include "model/cpu_model.h"
#include "model/init.h"

using namespace pgolf;

namespace {

ModelConfig bench_config(const std::string& preset, int64_t d, int64_t layers) {
  Config c = Config::load(preset);
  c.set("vocab_size", int64_t{1024});
  c.set("model_dim", d);
  c.set("num_layers", layers);
  const int64_t heads = std::max<int64_t>(1, d / 64);
  c.set("num_heads", heads);
  c.set("num_kv_heads", std::max<int64_t>(1, heads / 2));
  if (preset == "s1560") {
    c.set("loop_start", layers / 2 - 1);
    c.set("loop_end", layers / 2);
    c.set("parallel_start_layer", layers - 2);
    c.set("xsa_last_n", layers);
  }
  return ModelConfig::from_config(c);
}

void run(benchmark::State& state, const std::string& preset) {
  const int64_t d = state.range(0), layers = state.range(1), T = state.range(2), B = 4;
  CpuModel<float> model(bench_config(preset, d, layers));
  init_params(model.params(), 1);
  model.set_looping(model.config().has_looping());
  Batch batch;
  batch.rows = B;
  batch.seq_len = T;
  Rng rng(2);
  for (int64_t i = 0; i < B * T; ++i) {
    batch.inputs.push_back(static_cast<int32_t>(rng.below(1024)));
    batch.targets.push_back(static_cast<int32_t>(rng.below(1024)));
  }
  for (auto _ : state) {
    model.zero_grad();
    benchmark::DoNotOptimize(model.forward(batch));
    model.backward();
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B * T), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["params"] = static_cast<double>(model.params().layout().count());
}

void BM_CpuModelBaseline(benchmark::State& state) { run(state, "baseline"); }
void BM_CpuModelS1560(benchmark::State& state) { run(state, "s1560"); }

}  // namespace

BENCHMARK(BM_CpuModelBaseline)->Args({128, 4, 256})->Args({256, 6, 256})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CpuModelS1560)->Args({128, 6, 256})->Unit(benchmark::kMillisecond)->UseRealTime();

