// GpuOptimizer against the CPU Optimizer: whole steps of the full-size s691 and s1560 layouts, the
// golden one-step of the reference scripts, a step captured into a CUDA graph, and the state moving
// between the CPU and the GPU optimizers.
//
// Tolerances: AdamW, the clip coefficient and the momentum buffers are elementwise with the CPU's
// roundings (update_math.h), so they must match bit for bit; the Muon parameters go through bf16
// Newton–Schulz, whose products accumulate in another order than OpenBLAS's, so their distance to
// the fp32-Muon CPU step may be at most k = 2 times the CPU bf16 emulation's (ENGINEERING §4; the
// reasoning is in test_gpu_muon.cpp).
#include <gtest/gtest.h>

#include <cmath>

#include "backend/cuda/gpu_optimizer.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "optim/clip.h"
#include "optim/golden_stack.h"
#include "optim_test_util.h"

namespace pgolf::test {
namespace {

optim::OptimizerConfig optimizer_config(const Config& c, const std::string& ns_dtype) {
  Config copy = c;
  copy.set("muon_ns_dtype", ns_dtype);
  return optim::OptimizerConfig::from_config(copy);
}

class GpuOptimizerPreset : public CudaTest, public ::testing::WithParamInterface<std::string> {};

// One step (lr scale 0.6, momentum 0.93) with random gradients that the 0.3 clip scales (several
// steps are checked bit for bit on smaller layouts; each full-size CPU reference step takes about
// 15-20 s on 16 cores).
TEST_P(GpuOptimizerPreset, FullSizeStepMatchesTheCpuOptimizer) {
  const Config config = preset_config(GetParam(), false);
  const ParamLayout layout = preset_layout(config);
  const double clip = config.get_double("grad_clip_norm");
  ASSERT_GT(clip, 0.0);
  Rng rng(31);
  ParamSet<float> initial(layout);
  fill_normal(initial.all(), rng, 0.02);
  ParamSet<float> emulated = initial, reference = initial;
  optim::Optimizer cpu(layout, optimizer_config(config, "bf16"));
  optim::Optimizer cpu_fp32(layout, optimizer_config(config, "fp32"));
  cuda::GpuOptimizer gpu(layout, optimizer_config(config, "bf16"), clip);
  cuda::DeviceBuffer<float> device_params = upload(initial.all());

  ParamSet<float> grads(layout);
  fill_normal(grads.all(), rng, 1e-3);
  cuda::DeviceBuffer<float> device_grads = upload(grads.all());
  gpu.step(device_params.data(), device_grads.data(), 0, 0.6, 0.93, nullptr);
  const double norm = optim::clip_grad_norm(grads.all(), clip);
  ASSERT_LT(optim::clip_coefficient(norm, clip), 1.0f);
  EXPECT_NEAR(gpu.grad_norm(nullptr), norm, static_cast<double>(layout.total()) * std::ldexp(1.0, -53) * norm);
  cpu.step(emulated, grads, 0, 0.6, 0.93);
  cpu_fp32.step(reference, grads, 0, 0.6, 0.93);
  const ParamSet<float> got = download_params(layout, device_params);
  for (size_t i = 0; i < layout.size(); ++i) {
    const ParamSpec& s = layout.spec(i);
    if (s.group != ParamGroup::Matrix) {
      EXPECT_EQ(bit_mismatches(got[i], emulated[i]), 0u) << s.name;
      continue;
    }
    const std::vector<float> g(got[i].begin(), got[i].end()), naive(emulated[i].begin(), emulated[i].end());
    const std::vector<double> ref(reference[i].begin(), reference[i].end());
    expect_within_naive(s.name, g, naive, ref, 2.0);
  }
  const TensorMap want_state = cpu.state_tensors(), got_state = gpu.state_tensors();
  ASSERT_EQ(got_state.names(), want_state.names());
  for (const std::string& name : want_state.names()) {
    if (name == "optim/step") continue;
    EXPECT_EQ(bit_mismatches(got_state.get(name).as<float>(), want_state.get(name).as<float>()), 0u) << name;
  }
}

// The reference scripts' step (golden/README "One optimizer step"): from the dumped parameters and
// gradients, lr scale 1, Muon momentum 0.92, clip 0.3; bounds of the README: AdamW 5e-7 (the
// references' own CPU-vs-GPU gap is 4.8e-7), bf16 Muon 1e-3 abs or 10 % of the update (their
// CPU-vs-GPU gap is 6.8e-4 / 7.7e-4, 6-8 % of the update).
TEST_P(GpuOptimizerPreset, GoldenStepMatchesTheReference) {
  const GoldenStack g = load_golden_stack(GetParam());
  const ParamSet<float> before = golden_params(g, ""), grads = golden_params(g, "grad/");
  const ParamSet<float> expected = golden_params(g, "step1/");
  cuda::GpuOptimizer gpu(g.layout, optimizer_config(g.config, "bf16"), g.config.get_double("grad_clip_norm"));
  cuda::DeviceBuffer<float> device_params = upload(before.all()), device_grads = upload(grads.all());
  gpu.step(device_params.data(), device_grads.data(), 0, 1.0, 0.92, nullptr);
  const double golden_norm = g.meta.at("step1").at("grad_total_norm_before_clip").get<double>();
  EXPECT_NEAR(gpu.grad_norm(nullptr), golden_norm, 1e-6 * golden_norm);  // an fp32 reduction in the reference

  const ParamSet<float> got = download_params(g.layout, device_params);
  for (size_t i = 0; i < g.layout.size(); ++i) {
    double diff = 0.0, update = 0.0;
    for (size_t k = 0; k < got[i].size(); ++k) {
      diff = std::max(diff, std::fabs(static_cast<double>(got[i][k]) - expected[i][k]));
      update = std::max(update, std::fabs(static_cast<double>(before[i][k]) - expected[i][k]));
    }
    if (g.layout.spec(i).group == ParamGroup::Matrix)
      EXPECT_TRUE(diff <= 1e-3 || diff <= 0.1 * update)
          << g.layout.spec(i).name << ": diff " << diff << ", update " << update;
    else
      EXPECT_LE(diff, 5e-7) << g.layout.spec(i).name;
  }
}

INSTANTIATE_TEST_SUITE_P(Stacks, GpuOptimizerPreset, ::testing::Values("s691", "s1560"));

struct SmallRun {
  ParamLayout layout;
  optim::OptimizerConfig config;
  double clip;
  ParamSet<float> initial;
  std::vector<ParamSet<float>> grads;  // one per step

  SmallRun(const std::string& preset, int steps, uint64_t seed) {
    const Config c = preset_config(preset, true);
    layout = preset_layout(c);
    config = optimizer_config(c, "bf16");
    clip = c.get_double("grad_clip_norm");
    Rng rng(seed);
    initial = ParamSet<float>(layout);
    fill_normal(initial.all(), rng, 0.05);
    for (int k = 0; k < steps; ++k) {
      grads.emplace_back(layout);
      fill_normal(grads.back().all(), rng, 0.02);
    }
  }
};

constexpr double kLrScales[] = {1.0, 0.5, 0.25};
constexpr double kMomenta[] = {0.92, 0.95, 0.97};

// One step captured into a graph and replayed twice with different lr scales and momenta (and other
// gradients copied into the captured buffer) equals two direct steps, bit for bit: the scalars are
// read at replay time, not baked into the graph.
class GpuOptimizerGraph : public CudaTest {};

TEST_F(GpuOptimizerGraph, CapturedStepReplaysLikeDirectSteps) {
  const SmallRun run("s1560", 2, 41);
  cuda::DeviceBuffer<float> direct_params = upload(run.initial.all()), graph_params = upload(run.initial.all());
  cuda::GpuOptimizer direct(run.layout, run.config, run.clip), captured(run.layout, run.config, run.clip);
  cudaStream_t stream;
  PG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (int k = 0; k < 2; ++k) {
    cuda::DeviceBuffer<float> grads = upload(run.grads[k].all());
    direct.step(direct_params.data(), grads.data(), k, kLrScales[k], kMomenta[k], stream);
    PG_CUDA_CHECK(cudaStreamSynchronize(stream));  // before `grads` is freed
  }
  cuda::DeviceBuffer<float> graph_grads(static_cast<size_t>(run.layout.total()));
  cudaGraph_t graph;
  PG_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  captured.enqueue_step(graph_params.data(), graph_grads.data(), stream);
  PG_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  PG_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int k = 0; k < 2; ++k) {
    PG_CUDA_CHECK(cudaMemcpyAsync(graph_grads.data(), run.grads[k].all().data(), graph_grads.bytes(),
                                  cudaMemcpyHostToDevice, stream));
    captured.begin_step(k, kLrScales[k], kMomenta[k], stream);
    PG_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  }
  PG_CUDA_CHECK(cudaStreamSynchronize(stream));
  EXPECT_EQ(bit_mismatches(graph_params.download(), direct_params.download()), 0u);
  const TensorMap a = direct.state_tensors(), b = captured.state_tensors();
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& name : a.names()) {
    if (name == "optim/step") continue;
    EXPECT_EQ(bit_mismatches(a.get(name).as<float>(), b.get(name).as<float>()), 0u) << name;
  }
  EXPECT_EQ(captured.steps_taken(), 2);
  PG_CUDA_CHECK(cudaGraphExecDestroy(exec));
  PG_CUDA_CHECK(cudaGraphDestroy(graph));
  PG_CUDA_CHECK(cudaStreamDestroy(stream));
}

class GpuOptimizerState : public CudaTest, public ::testing::WithParamInterface<std::string> {};

// GPU state after two steps = the CPU's (names, shapes, values); saved through a safetensors file
// image and loaded into a fresh GPU optimizer, the run continues bit for bit; the CPU optimizer can
// load it and continue too (its AdamW bit for bit). Mismatched state is rejected.
TEST_P(GpuOptimizerState, MovesBetweenCpuAndGpu) {
  const SmallRun run(GetParam(), 3, 51);
  ParamSet<float> cpu_params = run.initial;
  optim::Optimizer cpu(run.layout, run.config);
  cuda::GpuOptimizer gpu(run.layout, run.config, run.clip);
  cuda::DeviceBuffer<float> params = upload(run.initial.all());
  for (int k = 0; k < 2; ++k) {
    cuda::DeviceBuffer<float> grads = upload(run.grads[k].all());
    gpu.step(params.data(), grads.data(), k, kLrScales[k], kMomenta[k], nullptr);
    ParamSet<float> clipped = run.grads[k];
    optim::clip_grad_norm(clipped.all(), run.clip);
    cpu.step(cpu_params, clipped, k, kLrScales[k], kMomenta[k]);
  }
  const TensorMap saved = parse_safetensors(serialize_safetensors(gpu.state_tensors()), "GPU optimizer state");
  const TensorMap cpu_state = cpu.state_tensors();
  ASSERT_EQ(saved.names(), cpu_state.names());
  for (const std::string& name : cpu_state.names()) {
    EXPECT_EQ(saved.get(name).shape, cpu_state.get(name).shape) << name;
    if (name == "optim/step") {
      EXPECT_EQ(saved.get(name).as<int64_t>()[0], 2);
    } else {
      EXPECT_EQ(bit_mismatches(saved.get(name).as<float>(), cpu_state.get(name).as<float>()), 0u) << name;
    }
  }

  // A fresh GPU optimizer from the saved state continues exactly as the original.
  ParamSet<float> after_two = download_params(run.layout, params);
  cuda::GpuOptimizer resumed(run.layout, run.config, run.clip);
  resumed.load_state_tensors(saved, "GPU optimizer state");
  EXPECT_EQ(resumed.steps_taken(), 2);
  cuda::DeviceBuffer<float> resumed_params = upload(after_two.all());
  cuda::DeviceBuffer<float> grads = upload(run.grads[2].all());
  gpu.step(params.data(), grads.data(), 2, kLrScales[2], kMomenta[2], nullptr);
  resumed.step(resumed_params.data(), grads.data(), 2, kLrScales[2], kMomenta[2], nullptr);
  const ParamSet<float> gpu_three = download_params(run.layout, params);
  EXPECT_EQ(bit_mismatches(resumed_params.download(), gpu_three.all()), 0u);

  // The CPU optimizer loads the GPU's state and takes the same third step (AdamW bit for bit).
  optim::Optimizer from_gpu(run.layout, run.config);
  from_gpu.load_state_tensors(saved, "GPU optimizer state");
  ParamSet<float> clipped = run.grads[2];
  optim::clip_grad_norm(clipped.all(), run.clip);
  from_gpu.step(after_two, clipped, 2, kLrScales[2], kMomenta[2]);
  for (size_t i = 0; i < run.layout.size(); ++i) {
    if (run.layout.spec(i).group == ParamGroup::Matrix) continue;
    EXPECT_EQ(bit_mismatches(gpu_three[i], after_two[i]), 0u) << run.layout.spec(i).name;
  }

  // State of another preset, or a step index that disagrees with the state, is an error.
  const SmallRun other(GetParam() == "s691" ? "s1560" : "s691", 1, 52);
  cuda::GpuOptimizer wrong(other.layout, other.config, other.clip);
  EXPECT_THROW(wrong.load_state_tensors(saved, "GPU optimizer state"), Error);
  EXPECT_THROW(resumed.begin_step(1, 1.0, 0.9, nullptr), Error);
}

INSTANTIATE_TEST_SUITE_P(Stacks, GpuOptimizerState, ::testing::Values("s691", "s1560"));

class GpuOptimizerConfig : public CudaTest {};

TEST_F(GpuOptimizerConfig, Fp32NewtonSchulzIsRejected) {
  const SmallRun run("s691", 0, 61);
  optim::OptimizerConfig config = run.config;
  config.matrix.numerics = optim::MuonNumerics::F32;
  EXPECT_THROW(cuda::GpuOptimizer(run.layout, config, 0.3), Error);
}

}  // namespace
}  // namespace pgolf::test
