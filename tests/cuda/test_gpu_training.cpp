// A short training run of a small s691-style model on FineWeb tokens, on the GPU and on the CPU from
// the same initial weights, batches and optimizer (adamw_step.h): the GPU's loss curve must follow the
// CPU's. The CPU reference computes as the GPU model does with its weights: fp32 master weights stepped
// by AdamW, the forward and backward on their bf16-rounded copies (in fp32 arithmetic, the norm-input
// gradients rounded to bf16 where GpuModel stores them so). Each step's
// loss then differs by the bf16 activations only (~1e-3 relative, gpu_model_check.h) and the two runs'
// weights drift apart a little every step; over 30 steps at loss ~6 the curves must stay within 0.05
// (under 1 %) of each other while both fall by at least 0.3.
//
// Why the bf16 weight copies in the reference: this run is sensitive at step 21, where a plain fp32
// CPU run and any bf16-weight run part by ~0.11 (0.107 measured on an H100 for the GPU, 0.114 for the
// CPU reference on bf16 copies, which itself follows the GPU within 0.007) before re-converging by
// step 29. With AdamW's β2 = 0.95 the run spikes there and the spike's height is chaotic (GPU runs
// 6.2 to 7.3, fp32 CPU 6.54): adamw_step.h uses β2 = 0.99. test_gpu_step_check.cpp checks the kernels
// step by step on the CPU run's own weights.
#include <gtest/gtest.h>

#include <cstdio>

#include "adamw_step.h"
#include "backend/cuda/gpu_model.h"
#include "core/half.h"
#include "cuda_test_util.h"
#include "data/shard.h"
#include "model/cpu_model.h"
#include "model/init.h"
#include "test_util.h"
#include "training_run.h"

namespace pgolf::test {
namespace {

class GpuTrainingTest : public CudaTest {};

TEST_F(GpuTrainingTest, LossCurveFollowsTheCpuRun) {
  const ModelConfig cfg = small_s691();
  const Shard shard(val_prefix_shard(), cfg.vocab_size);
  const int steps = 30, rows = 8, T = 256;
  ASSERT_GE(shard.size(), int64_t{steps} * rows * (T + 1));
  ParamSet<float> init(ParamLayout(param_specs(cfg)));
  init_params(init, 2024);
  const AdamW opt;

  CpuModel<float> cpu(cfg), fp32(cfg);  // bf16 weight copies (the reference) / plain fp32 (printed)
  ParamSet<float> master = init;
  fp32.params() = init;
  cpu.set_bf16_norm_grads(true);  // and its norm-input gradients bf16, as GpuModel stores them
  std::vector<float> cm(init.all().size(), 0.f), cv(cm.size(), 0.f), fm(cm), fv(cm);
  cuda::GpuModel gpu(cfg, cuda::GpuModelOptions{int64_t{rows} * T});
  gpu.load_params(init);
  const int64_t n = gpu.layout().total();
  cuda::DeviceBuffer<float> gm(static_cast<size_t>(n)), gv(static_cast<size_t>(n));
  gm.fill_bytes(0);
  gv.fill_bytes(0);

  std::vector<double> cpu_loss, fp32_loss, gpu_loss;
  for (int s = 0; s < steps; ++s) {
    const Batch batch = batch_at(shard.tokens(), s, rows, T);
    for (size_t i = 0; i < master.all().size(); ++i) cpu.params().all()[i] = round_to_bf16(master.all()[i]);
    cpu.zero_grad();
    cpu_loss.push_back(cpu.forward(batch));
    cpu.backward();
    adamw_step_host(master.all(), cm, cv, cpu.grads().all(), opt, s + 1);
    fp32.zero_grad();
    fp32_loss.push_back(fp32.forward(batch));
    fp32.backward();
    adamw_step_host(fp32.params().all(), fm, fv, fp32.grads().all(), opt, s + 1);

    gpu.zero_grad();
    gpu.set_batch(batch);
    gpu.forward();
    gpu.backward();
    adamw_step_device(gpu.params(), gm.data(), gv.data(), gpu.grads(), n, opt, s + 1);
    gpu.params_changed();
    gpu_loss.push_back(gpu.loss());
  }
  double worst = 0;
  std::printf("  step   cpu bf16 weights   gpu      |diff|     (cpu fp32)\n");
  for (int s = 0; s < steps; ++s) {
    const double diff = std::fabs(gpu_loss[s] - cpu_loss[s]);
    worst = std::max(worst, diff);
    std::printf("  %4d   %.5f          %.5f  %.2e   (%.5f)\n", s, cpu_loss[s], gpu_loss[s], diff, fp32_loss[s]);
  }
  EXPECT_LE(worst, 0.05) << "the GPU loss curve left the CPU's";
  EXPECT_LE(cpu_loss.back(), cpu_loss.front() - 0.3) << "the CPU run did not learn";
  EXPECT_LE(gpu_loss.back(), gpu_loss.front() - 0.3) << "the GPU run did not learn";
}

}  // namespace
}  // namespace pgolf::test
