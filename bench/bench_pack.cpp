// Artifact size and time per compressor for the full-size s691 model (26,993,756 parameters) with
// stand-in N(0, 0.02²) weights: a format and timing check (trained weights compress differently).
// Run: build/pgolf_microbench --benchmark_filter=S691 (counters: model_bytes, payload_bytes).
#include <benchmark/benchmark.h>

#include "quant/artifact.h"
#include "quant/pack.h"
#include "quant/stand_in.h"

namespace {

using namespace pgolf;

const Config& s691() {
  static const Config c = Config::load("s691");
  return c;
}
const TensorMap& stand_in_weights() {
  static const TensorMap w = stand_in_parameters(s691(), 0.02, 1234);
  return w;
}
const Artifact& quantized() {
  static const Artifact a = build_artifact(s691(), stand_in_weights(), nullptr);
  return a;
}

void BM_QuantizeS691(benchmark::State& state) {
  stand_in_weights();
  for (auto _ : state) benchmark::DoNotOptimize(build_artifact(s691(), stand_in_weights(), nullptr));
  state.counters["params"] = 26993756;
}

void BM_CompressS691(benchmark::State& state, const char* compressor, bool shuffle) {
  Artifact a = quantized();
  Config c = s691();
  apply_compressor_spec(c, compressor);
  c.set("byte_shuffle", shuffle);
  a.compression = CompressionSpec::from_config(c);
  ArtifactSizes sizes;
  for (auto _ : state) benchmark::DoNotOptimize(serialize_artifact(a, &sizes));
  state.counters["model_bytes"] = static_cast<double>(sizes.file_bytes);
  state.counters["payload_bytes"] = static_cast<double>(sizes.payload_bytes);
}

}  // namespace

BENCHMARK(BM_QuantizeS691)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_CompressS691, zstd_22, "zstd-22", false)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_CompressS691, lzma_6, "lzma-6", false)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_CompressS691, lzma_9e, "lzma-9e", false)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_CompressS691, brotli_11, "brotli-11", false)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();
BENCHMARK_CAPTURE(BM_CompressS691, brotli_11_shuffle, "brotli-11", true)
    ->Unit(benchmark::kSecond)
    ->Iterations(1)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_CompressS691, zlib_9, "zlib-9", false)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();

BENCHMARK_MAIN();
