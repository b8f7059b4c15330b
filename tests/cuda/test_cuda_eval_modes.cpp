// Every scoring evaluation mode (SPEC §6) on the CUDA engine against the CPU engine, on the tiny head-dim-64
// models with the evaluation tests' settings (tests/eval/eval_fixture.h: several windows, chunks,
// documents, LoRA batches and phases at T = 16): the same targets and bytes are scored, and the mean
// loss agrees within the bf16 tolerance of gpu_model_check.h — once for the modes that only score,
// five times for the modes that train between scores (the AdamW TTT test's bound: a few steps on
// bf16 gradients, each within the gradient tolerance, move the later scores further apart). The flat
// evaluation (whole T_eval sequences) is CudaEngineTest.TokenLossesMatchTheCpuAndChunkByRows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "backend/cuda/cuda_engine.h"
#include "cuda_test_util.h"
#include "eval/eval_fixture.h"
#include "gpu_model_check.h"
#include "tiny64.h"

namespace pgolf::test {
namespace {

class GpuEvalModes : public CudaTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(GpuEvalModes, EveryModeFollowsTheCpuEngine) {
  Config c = tiny64_preset(GetParam());
  apply_eval_test_settings(c);
  c.set("ttt_lora_rank", int64_t{8});  // the GPU's LoRA GEMMs take ranks in multiples of 8 (16-byte rows)
  const std::vector<uint16_t> stream = audit_stream();
  const ByteTables tables = made_up_tables(kEvalVocab);
  const EvalInputs inputs{stream, &tables, kEvalBos, kEvalSeqLen};
  const ParamSet<float> params = eval_test_params(c, 17);
  auto comm = make_single_process_communicator();
  CpuEngine cpu(c, *comm);
  cuda::CudaEngine gpu(c, *comm, cuda::CudaEngineOptions{256, false, true});
  for (const std::string mode : {"sliding", "ttt-sgd", "ttt-adamw", "ttt-lora", "ttt-phased"}) {
    // The settings' SGD rate (0.05) makes AdamW diverge, where the two engines' paths part at random;
    // AdamW TTT takes its usual scale of rate.
    c.set("ttt_lr", mode == "ttt-adamw" ? 1e-3 : 0.05);
    cpu.load_params(params);
    gpu.load_params(params);
    const EvalOutcome want = run_eval_mode(mode, cpu, *comm, c, inputs);
    const EvalOutcome got = run_eval_mode(mode, gpu, *comm, c, inputs);
    std::printf("  %-10s cpu loss %.6f bpb %.6f | gpu loss %.6f bpb %.6f\n", mode.c_str(), want.val_loss(),
                want.val_bpb(), got.val_loss(), got.val_bpb());
    EXPECT_EQ(got.tokens(), want.tokens()) << mode;
    EXPECT_EQ(got.bytes(), want.bytes()) << mode;
    EXPECT_EQ(got.legal, want.legal) << mode;
    EXPECT_TRUE(got.complete) << mode;
    const bool trains = mode.rfind("ttt-", 0) == 0;
    EXPECT_LE(std::fabs(got.val_loss() - want.val_loss()), (trains ? 5 : 1) * kMeanLossTol) << mode;
  }
}

INSTANTIATE_TEST_SUITE_P(Stacks, GpuEvalModes, ::testing::Values("s691", "s1560"));

}  // namespace
}  // namespace pgolf::test
