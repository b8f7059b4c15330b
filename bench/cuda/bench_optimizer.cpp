// bench_cuda's optimizer section: the whole GPU optimizer step (gradient clipping, AdamW, Muon, EMA)
// of the full-size s691 and s1560 layouts, launched directly and as a CUDA graph, and its parts.
#include <fmt/core.h>

#include <string>
#include <vector>

#include "backend/cuda/gpu_ema.h"
#include "backend/cuda/gpu_optimizer.h"
#include "bench_util.h"
#include "core/config.h"
#include "core/rng.h"
#include "model/config.h"

namespace pgolf::cuda {
namespace {

DeviceBuffer<float> random_f32(size_t count, double scale, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> host(count);
  for (float& x : host) x = static_cast<float>(scale * rng.uniform(-1.0, 1.0));
  return DeviceBuffer<float>(host, "benchmark input");
}

const char* form_name(NsForm f) { return f == NsForm::kScaleThenSquare ? "(cA)A" : "c(AA)"; }

void bench_preset(const std::string& preset, const Timer& timer) {
  const Config config = Config::load(preset);
  const ParamLayout layout(param_specs(ModelConfig::from_config(config)));
  const int64_t n = layout.total();
  DeviceBuffer<float> params = random_f32(static_cast<size_t>(n), 0.05, 1);
  DeviceBuffer<float> grads = random_f32(static_cast<size_t>(n), 2e-3, 2);  // norm ≈ 6 > 0.3: the clip scales
  GpuOptimizer opt(layout, optim::OptimizerConfig::from_config(config), config.get_double("grad_clip_norm"));
  GpuEma ema(layout, params.data(), config.get_double("ema_decay"));
  cudaStream_t s = timer.stream;
  const std::string label = "optim " + preset;
  const std::string size = fmt::format("{} params, {} Muon matrices", n, [&] {
    int slots = 0;
    for (size_t g = 0; g < opt.muon().group_count(); ++g) slots += opt.muon().group(g).batch();
    return slots;
  }());

  auto step = [&] {
    opt.begin_step(opt.steps_taken(), 0.8, 0.95, s);
    opt.enqueue_step(params.data(), grads.data(), s);
    ema.update(params.data(), s);
  };
  row(label + " step + EMA (direct)", size, timer.median_ms(step), 0);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  PG_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  opt.enqueue_step(params.data(), grads.data(), s);
  ema.update(params.data(), s);
  PG_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  PG_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  size_t nodes = 0;
  PG_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
  row(label + " step + EMA (graph)", fmt::format("{} graph nodes", nodes), timer.median_ms([&] {
    opt.begin_step(opt.steps_taken(), 0.8, 0.95, s);
    PG_CUDA_CHECK(cudaGraphLaunch(exec, s));
  }),
      0);
  PG_CUDA_CHECK(cudaGraphExecDestroy(exec));
  PG_CUDA_CHECK(cudaGraphDestroy(graph));

  // The parts, each launched directly (their launch gaps included).
  row(label + "   clip (norm, 2 kernels)", fmt::format("{} grads", n),
      timer.median_ms([&] { opt.clip().enqueue(grads.data(), n, s); }), 0);
  row(label + "   AdamW (1 kernel)", fmt::format("{} values", opt.adamw().state_size()), timer.median_ms([&] {
    opt.adamw().enqueue(params.data(), grads.data(), opt.device_scalars(), opt.clip().state(), s);
  }),
      0);
  row(label + "   Muon momentum+norms+pack", "3 kernels",
      timer.median_ms([&] { opt.muon().enqueue_prepare(grads.data(), opt.device_scalars(), opt.clip().state(), s); }),
      0);
  double ns_flops = 0;
  for (size_t g = 0; g < opt.muon().group_count(); ++g) {
    BatchedNewtonSchulz& group = opt.muon().group(g);
    const double flops = group.flops_per_step() * opt.muon().ns_steps();
    ns_flops += flops;
    row(label + "   Newton-Schulz batch",
        fmt::format("{} x [{}, {}] {}", group.batch(), group.n(), group.m(), form_name(group.form())),
        timer.median_ms([&] { group.run(opt.muon().gemm(), opt.muon().ns_steps(), s); }), flops);
  }
  row(label + "   Newton-Schulz (all batches)", fmt::format("{} steps", opt.muon().ns_steps()),
      timer.median_ms([&] { opt.muon().enqueue_newton_schulz(s); }), ns_flops);
  row(label + "   Muon apply (1 kernel)", "",
      timer.median_ms([&] { opt.muon().enqueue_apply(params.data(), opt.device_scalars(), s); }), 0);
  row(label + "   EMA (1 kernel)", fmt::format("{} values", n), timer.median_ms([&] { ema.update(params.data(), s); }),
      0);
}

}  // namespace

void bench_optimizer(const Timer& timer) {
  for (const char* preset : {"s691", "s1560"}) bench_preset(preset, timer);
}

}  // namespace pgolf::cuda
