// One Muon step (momentum, Newton–Schulz with 5 iterations, decayed update) on four 512×1536
// matrices — the shape of a full-size MLP weight — on the CPU, in both numerics.
#include <benchmark/benchmark.h>

#include "core/rng.h"
#include "optim/muon.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

constexpr int kMatrices = 4;
constexpr int64_t kRows = 512, kCols = 1536;

void BM_MuonStep(benchmark::State& state) {
  std::vector<ParamSpec> specs;
  for (int i = 0; i < kMatrices; ++i)
    specs.push_back({std::string("mlp.") + std::to_string(i), {kRows, kCols}, ParamGroup::Matrix, InitKind::Zeros});
  const ParamLayout layout(specs);
  ParamSet<float> params(layout), grads(layout);
  Rng rng(1);
  for (float& x : params.all()) x = static_cast<float>(0.02 * rng.normal());
  for (float& x : grads.all()) x = static_cast<float>(0.001 * rng.normal());
  MuonOptions o;
  o.lr = 0.025;
  o.weight_decay = 0.04;
  o.numerics = state.range(0) == 0 ? MuonNumerics::F32 : MuonNumerics::BF16;
  std::vector<size_t> members(kMatrices);
  for (int i = 0; i < kMatrices; ++i) members[i] = static_cast<size_t>(i);
  Muon muon(layout, members, o);
  for (auto _ : state) {
    muon.step(params, grads, 1.0, 0.95);
    benchmark::DoNotOptimize(params.all().data());
  }
  // Newton–Schulz flops per matrix and iteration, counted as GEMMs: X·Xᵀ (2·r·r·c), A·A (2·r³),
  // B·X (2·r·r·c) — X·Xᵀ runs as a symmetric rank-k update at half of its count.
  const double flops = kMatrices * 5.0 * (4.0 * kRows * kRows * kCols + 2.0 * kRows * kRows * kRows);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(o.numerics == MuonNumerics::F32 ? "fp32" : "bf16-emulated");
}

BENCHMARK(BM_MuonStep)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

