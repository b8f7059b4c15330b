// Data-parallel training on the CUDA engine, several ranks on one GPU (the thread device
// communicator): W ranks with one micro-batch each against one rank accumulating the W micro-batches
// (the references' rule), for a per-matrix Muon stack (s691: every gradient averaged) and the banked
// stack (s1560: Parallel Muon — bank gradients reduce-scattered, each rank orthogonalising its
// slices, updates all-gathered); the optimizer state gathered from the ranks; a save / reload under
// Parallel Muon; and the 2-rank GPU run against the CPU engine's 2-rank run.
//
// Deterministic mode throughout (no atomics in the backward), so that differences come from the
// distribution alone. Tolerances:
//
// * The W-rank step is the one-rank step with the gradient averaged in another order (fp32 values
//   summed in fp64; bank gradients rounded to bf16 on each rank before their average, as the
//   references send them: 2⁻⁹ relative). Both runs take these gradients through the same bf16
//   Newton–Schulz and, at the next step, the same bf16 forward, where such differences flip
//   roundings, so the runs drift apart at the level of the bf16 numerics. The bound is therefore
//   FlashAttention's rule, as the CPU engine's bf16 Parallel Muon test has it: weights, EMA and
//   momenta of the W-rank run may differ from the one-rank GPU run's by at most twice the one-rank
//   GPU run's own distance from the fp32 computation (the CPU engine with fp32 Newton–Schulz). (On
//   the CPU, bf16 W-rank runs of these models land at 0.6–1.4 times the bf16 run's distance from
//   fp32.) A mistake of the sharding (a slice stepped with another slice's gradient or momentum, an
//   update lost or applied twice) moves whole slices by a full update, far beyond that. Losses: within
//   kMeanLossTol (gpu_model_check.h) plus kGradTol times the loss's fall so far (to first order a
//   loss moves with the weights, which stay within a few percent of the distance travelled).
// * After one step the momenta are the averaged gradients themselves: fp32 state (AdamW moments,
//   per-matrix Muon) differs only by fp32 summation order (< 1e-5 relative), the bf16 bank momenta
//   by the roundings of the bf16 reduction: each rank's gradient rounded (2⁻⁹ of its own size, at
//   most Σ‖g_r‖ / ‖Σ g_r‖ times that of the average: about √W = 2 for 4 unrelated micro-batches), the
//   average rounded (2⁻⁹), against the one-rank rounding (2⁻⁹): at most 2⁻⁷; we allow 2⁻⁶.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_engine.h"
#include "cuda_test_util.h"
#include "dist/communicator.h"
#include "dist/cuda_thread_communicator.h"
#include "gpu_model_check.h"
#include "model/init.h"
#include "model/tiny_models.h"
#include "tiny64.h"
#include "train/cpu_engine.h"

namespace pgolf::test {
namespace {

class ParallelMuonTest : public CudaTest {};

constexpr int kSteps = 4;
constexpr double kFp32StateTol = 1e-5;
constexpr double kBankMomentumTol = 1.0 / 64;

// Clipping off: clipping the accumulated gradient (one rank) and each rank's local gradient (the
// banked stack's rule) are different operations.
Config parallel_config(const std::string& stack) {
  Config c = tiny64_preset(stack);
  c.set("grad_clip_norm", 0.0);
  return c;
}

ParamSet<float> initial_params(const Config& c, uint64_t seed) {
  CpuModel<float> m(ModelConfig::from_config(c));
  perturbed_init(m, seed);
  return m.params();
}

// `count` one-row micro-batches (rows of batch64 batches).
std::vector<Batch> one_row_batches(int count, uint64_t seed) {
  std::vector<Batch> out;
  for (int k = 0; k < count; k += 2) {
    const Batch both = batch64(128, false, seed + static_cast<uint64_t>(k));
    for (int r = 0; r < 2 && k + r < count; ++r) {
      Batch b;
      b.rows = 1;
      b.seq_len = both.seq_len;
      b.inputs.assign(both.inputs.begin() + r * both.seq_len, both.inputs.begin() + (r + 1) * both.seq_len);
      b.targets.assign(both.targets.begin() + r * both.seq_len, both.targets.begin() + (r + 1) * both.seq_len);
      out.push_back(std::move(b));
    }
  }
  return out;
}

std::unique_ptr<Engine> make_cuda(const Config& c, Communicator& comm) {
  return std::make_unique<cuda::CudaEngine>(c, comm, cuda::CudaEngineOptions{160, true, true});
}

// What a rank ends with.
struct RunResult {
  std::vector<double> losses, grad_norms;
  ParamSet<float> params, ema;
  TensorMap state;
};

// `steps` steps with EMA from `init`: every rank trains on micro-batch `rank` (one rank: on all).
void train(Engine& e, const ParamSet<float>& init, std::span<const Batch> micro, int steps, RunResult& out) {
  e.load_params(init);
  e.set_looping(e.model_config().has_looping());
  e.init_ema();
  for (int s = 0; s < steps; ++s) {
    const StepResult r = e.train_step(micro, {s, 1.0, 0.9, true});
    out.losses.push_back(r.loss);
    out.grad_norms.push_back(r.grad_norm);
  }
  out.params = ParamSet<float>(e.layout());
  out.ema = ParamSet<float>(e.layout());
  e.store_params(out.params);
  e.store_ema(out.ema);
  out.state = e.optimizer_state();  // a collective under Parallel Muon
}

// One rank accumulating the micro-batches, on the GPU or (`cpu_fp32`) the CPU engine with fp32
// Newton–Schulz: the fp32 computation.
RunResult one_rank(const Config& c, const ParamSet<float>& init, const std::vector<Batch>& micro, int steps,
                   bool cpu_fp32 = false) {
  auto comm = make_single_process_communicator();
  std::unique_ptr<Engine> e;
  if (cpu_fp32) {
    Config f = c;
    f.set("muon_ns_dtype", std::string("fp32"));
    e = std::make_unique<CpuEngine>(f, *comm);
  } else {
    e = make_cuda(c, *comm);
  }
  RunResult r;
  train(*e, init, micro, steps, r);
  return r;
}

// Every rank's result; `engine` builds the rank's engine ("cuda": device ranks, "cpu": host threads).
std::vector<RunResult> ranks(const std::string& engine, const Config& c, const ParamSet<float>& init,
                             const std::vector<Batch>& micro, int world, int steps) {
  std::vector<RunResult> out(static_cast<size_t>(world));
  auto body = [&](Communicator& comm) {
    std::unique_ptr<Engine> e =
        engine == "cuda" ? make_cuda(c, comm) : std::unique_ptr<Engine>(std::make_unique<CpuEngine>(c, comm));
    train(*e, init, std::span<const Batch>(&micro[static_cast<size_t>(comm.rank())], 1), steps,
          out[static_cast<size_t>(comm.rank())]);
  };
  if (engine == "cuda")
    run_device_ranks(world, body);
  else
    run_thread_group(world, body);
  return out;
}

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// ‖a − b‖ / ‖b − from‖: the difference of two runs relative to the distance the reference travelled.
double relative_to_travel(std::span<const float> a, std::span<const float> b, std::span<const float> from) {
  double diff = 0, travel = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    travel += (static_cast<double>(b[i]) - from[i]) * (static_cast<double>(b[i]) - from[i]);
  }
  return std::sqrt(diff / travel);
}

// FlashAttention's rule (see the header): ‖ranks − one‖ <= 2 ‖one − fp32‖, relative to the travel.
void expect_within_twice_the_bf16_distance(const std::string& what, std::span<const float> ranks,
                                           std::span<const float> one, std::span<const float> fp32,
                                           std::span<const float> from) {
  const double distributed = relative_to_travel(ranks, one, from), bf16 = relative_to_travel(one, fp32, from);
  std::printf("    %-28s ranks vs one rank %.2e, one rank vs fp32 %.2e (of the distance travelled)\n", what.c_str(),
              distributed, bf16);
  EXPECT_GT(bf16, 0.0) << what << ": the bf16 run equals the fp32 one, the comparison proves nothing";
  EXPECT_LE(distributed, 2.0 * bf16) << what;
}

// The states' tensors of one kind ("momentum_buffer", "exp_avg", "exp_avg_sq") of the banks (3-D) or
// of everything else, concatenated.
std::vector<float> state_values(const TensorMap& state, const std::string& kind, bool banks) {
  std::vector<float> out;
  for (const std::string& name : state.names()) {
    const std::string suffix = "/" + kind;
    if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const HostTensor& t = state.get(name);
    if ((t.shape.size() == 3) != banks) continue;
    auto v = t.as<float>();
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

void expect_ranks_identical(const std::vector<RunResult>& r) {
  for (size_t k = 1; k < r.size(); ++k) {
    SCOPED_TRACE("rank " + std::to_string(k));
    EXPECT_EQ(r[k].losses, r[0].losses);
    EXPECT_TRUE(same_bits(r[k].params.all(), r[0].params.all()));
    EXPECT_TRUE(same_bits(r[k].ema.all(), r[0].ema.all()));
    ASSERT_EQ(r[k].state.names(), r[0].state.names());
    for (const std::string& name : r[0].state.names())
      EXPECT_EQ(r[k].state.get(name).bytes, r[0].state.get(name).bytes) << name;
  }
}

// ---- W ranks = one rank with accumulation --------------------------------------------------------

class RanksEqualOneRank : public ParallelMuonTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(RanksEqualOneRank, LossesWeightsEmaAndState) {
  const std::string stack = GetParam();
  const Config c = parallel_config(stack);
  const ParamSet<float> init = initial_params(c, 71);
  for (int world : {2, 4}) {
    SCOPED_TRACE(stack + " on " + std::to_string(world) + " ranks");
    const std::vector<Batch> micro = one_row_batches(world, 72);
    const RunResult one = one_rank(c, init, micro, kSteps);
    const RunResult fp32 = one_rank(c, init, micro, kSteps, true);
    const std::vector<RunResult> r = ranks("cuda", c, init, micro, world, kSteps);
    expect_ranks_identical(r);
    for (int s = 0; s < kSteps; ++s) {
      std::printf("  [%s, %d ranks] step %d loss one rank %.6f, ranks %.6f\n", stack.c_str(), world, s,
                  one.losses[s], r[0].losses[s]);
      EXPECT_NEAR(r[0].losses[s], one.losses[s], kMeanLossTol + kGradTol * std::fabs(one.losses[0] - one.losses[s]))
          << "step " << s;
    }
    // The first forward runs the same weights on the same rows in deterministic mode: the mean of the
    // ranks' losses is the one-rank mean of the micro-batch losses, bit for bit (a power-of-two count).
    EXPECT_EQ(r[0].losses[0], one.losses[0]);
    EXPECT_LT(one.losses.back(), one.losses.front() - 0.1) << "the run learns";
    expect_within_twice_the_bf16_distance("weights", r[0].params.all(), one.params.all(), fp32.params.all(),
                                          init.all());
    expect_within_twice_the_bf16_distance("EMA", r[0].ema.all(), one.ema.all(), fp32.ema.all(), init.all());
    ASSERT_EQ(r[0].state.names(), one.state.names());
    EXPECT_EQ(r[0].state.get("optim/step").bytes, one.state.get("optim/step").bytes);
    for (const bool banks : {false, true}) {
      for (const std::string kind : {"momentum_buffer", "exp_avg"}) {
        const std::vector<float> want = state_values(one.state, kind, banks);
        if (want.empty()) continue;
        // The state starts at zero: the travel is the state itself.
        const std::vector<float> zero(want.size(), 0.0f);
        expect_within_twice_the_bf16_distance(kind + (banks ? " (banks)" : ""), state_values(r[0].state, kind, banks),
                                              want, state_values(fp32.state, kind, banks), zero);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Stacks, RanksEqualOneRank, ::testing::Values("s691", "s1560"),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// After one step every momentum is the averaged gradient: the gathered state of 2 and 4 ranks is
// the one-rank state within the reduction's rounding (see the header), the same on every rank.
TEST_F(ParallelMuonTest, GatheredOptimizerStateIsTheOneRankState) {
  for (const std::string stack : {"s691", "s1560"}) {
    const Config c = parallel_config(stack);
    const ParamSet<float> init = initial_params(c, 81);
    for (int world : {2, 4}) {
      SCOPED_TRACE(stack + " on " + std::to_string(world) + " ranks");
      const std::vector<Batch> micro = one_row_batches(world, 82);
      const RunResult one = one_rank(c, init, micro, 1);
      const std::vector<RunResult> r = ranks("cuda", c, init, micro, world, 1);
      expect_ranks_identical(r);
      ASSERT_EQ(r[0].state.names(), one.state.names());
      size_t bank_momenta = 0;
      for (const std::string& name : one.state.names()) {
        if (name.rfind("optim/", 0) != 0) continue;  // the EMA: see RanksEqualOneRank
        const HostTensor& want = one.state.get(name);
        ASSERT_EQ(r[0].state.get(name).shape, want.shape) << name;
        if (want.dtype != DType::F32) {
          EXPECT_EQ(r[0].state.get(name).bytes, want.bytes) << name;
          continue;
        }
        const bool bank_momentum = want.shape.size() == 3 && name.find("momentum_buffer") != std::string::npos;
        bank_momenta += bank_momentum;
        const double e = rel_frobenius(r[0].state.get(name).as<float>(), want.as<float>());
        EXPECT_LE(e, bank_momentum ? kBankMomentumTol : kFp32StateTol) << name;
      }
      EXPECT_EQ(bank_momenta, stack == "s1560" ? 4u : 0u);
      const std::vector<float> momenta = state_values(one.state, "momentum_buffer", stack == "s1560");
      double momenta_sq = 0;
      for (float x : momenta) momenta_sq += static_cast<double>(x) * x;
      EXPECT_GT(momenta_sq, 0.0) << "a zero state proves nothing";
    }
  }
}

// Under Parallel Muon the state each rank saves is the whole one; loading it into fresh ranks (each
// keeps its own slices) continues the run bit for bit.
TEST_F(ParallelMuonTest, SaveReloadUnderParallelMuonIsBitExact) {
  const Config c = parallel_config("s1560");
  const ParamSet<float> init = initial_params(c, 91);
  constexpr int kWorld = 2;
  const std::vector<Batch> micro = one_row_batches(kWorld, 92);
  std::vector<RunResult> saved(kWorld), continued(kWorld), replayed(kWorld);
  run_device_ranks(kWorld, [&](Communicator& comm) {
    const size_t me = static_cast<size_t>(comm.rank());
    std::span<const Batch> mine(&micro[me], 1);
    auto a = make_cuda(c, comm);
    train(*a, init, mine, 2, saved[me]);
    for (int s = 2; s < 4; ++s) continued[me].losses.push_back(a->train_step(mine, {s, 1.0, 0.9, true}).loss);
    continued[me].params = saved[me].params;
    a->store_params(continued[me].params);

    auto b = make_cuda(c, comm);
    b->load_params(saved[me].params);
    b->set_looping(true);
    b->load_optimizer_state(saved[me].state, "saved state");
    for (int s = 2; s < 4; ++s) replayed[me].losses.push_back(b->train_step(mine, {s, 1.0, 0.9, true}).loss);
    replayed[me].params = saved[me].params;
    b->store_params(replayed[me].params);
  });
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(replayed[r].losses, continued[r].losses) << "rank " << r;
    EXPECT_TRUE(same_bits(replayed[r].params.all(), continued[r].params.all())) << "rank " << r;
  }
  // The saved state loads into the one-rank CPU engine: the same names and shapes as its own.
  auto single = make_single_process_communicator();
  CpuEngine cpu(c, *single);
  cpu.load_optimizer_state(saved[0].state, "2-rank GPU state");
  EXPECT_EQ(cpu.optimizer_state().names(), saved[0].state.names());
}

// ---- pipelined steps on several ranks --------------------------------------------------------------

// Engine::submit_train_step on 2 ranks: the loss average and StepControl::agree_max are reduced on the
// device behind each step (no collective at collection), so two steps in flight give every rank the
// same bits as one step at a time, and every rank gets the ranks' maximum of the agreed values.
TEST_F(ParallelMuonTest, PipelinedStepsOnRanksKeepTheBits) {
  constexpr int kWorld = 2;
  for (const std::string stack : {"s691", "s1560"}) {
    SCOPED_TRACE(stack);
    const Config c = parallel_config(stack);
    const ParamSet<float> init = initial_params(c, 111);
    const std::vector<Batch> micro = one_row_batches(kWorld, 112);
    std::vector<RunResult> runs[2];
    for (int pipelined = 0; pipelined < 2; ++pipelined) {
      runs[pipelined].resize(kWorld);
      run_device_ranks(kWorld, [&](Communicator& comm) {
        const int rank = comm.rank();
        std::unique_ptr<Engine> e = make_cuda(c, comm);
        e->load_params(init);
        e->set_looping(e->model_config().has_looping());
        e->init_ema();
        const std::span<const Batch> mine(&micro[static_cast<size_t>(rank)], 1);
        RunResult& out = runs[pipelined][static_cast<size_t>(rank)];
        auto control = [&](int s) {
          StepControl k{s, 1.0, 0.9, true};
          k.agree_max = {static_cast<double>(s + rank), -static_cast<double>(rank)};
          return k;
        };
        auto record = [&](const StepResult& r, int s) {
          out.losses.push_back(r.loss);
          out.grad_norms.push_back(r.grad_norm);
          EXPECT_EQ(r.agreed[0], static_cast<double>(s + kWorld - 1)) << "rank " << rank << " step " << s;
          EXPECT_EQ(r.agreed[1], 0.0) << "rank " << rank << " step " << s;
        };
        if (pipelined == 0) {
          for (int s = 0; s < kSteps; ++s) record(e->train_step(mine, control(s)), s);
        } else {
          e->submit_train_step(mine, control(0));
          for (int s = 1; s < kSteps; ++s) {
            e->submit_train_step(mine, control(s));
            EXPECT_EQ(e->train_steps_pending(), 2);
            record(e->collect_train_step(), s - 1);
          }
          record(e->collect_train_step(), kSteps - 1);
        }
        out.params = ParamSet<float>(e->layout());
        out.ema = ParamSet<float>(e->layout());
        e->store_params(out.params);
        e->store_ema(out.ema);
      });
    }
    for (int r = 0; r < kWorld; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      EXPECT_EQ(runs[1][r].losses, runs[0][r].losses);
      EXPECT_EQ(runs[1][r].grad_norms, runs[0][r].grad_norms);
      EXPECT_EQ(runs[1][r].losses, runs[1][0].losses);
      EXPECT_TRUE(same_bits(runs[1][r].params.all(), runs[0][r].params.all()));
      EXPECT_TRUE(same_bits(runs[1][r].ema.all(), runs[0][r].ema.all()));
    }
    EXPECT_LT(runs[1][0].losses.back(), runs[1][0].losses.front() - 0.1) << "the run learns";
  }
}

// ---- against the CPU engine ------------------------------------------------------------------------

// The GPU's 2-rank run follows the CPU engine's 2-rank run with test_cuda_engine.cpp's tolerances
// (TrainingStepsFollowTheCpuEngine): the first step at the kernel tolerance, later losses within 5 %.
TEST_F(ParallelMuonTest, TwoGpuRanksFollowTwoCpuRanks) {
  for (const std::string stack : {"s691", "s1560"}) {
    SCOPED_TRACE(stack);
    const Config c = parallel_config(stack);
    const ParamSet<float> init = initial_params(c, 101);
    const std::vector<Batch> micro = one_row_batches(2, 102);
    const std::vector<RunResult> gpu = ranks("cuda", c, init, micro, 2, kSteps);
    const std::vector<RunResult> cpu = ranks("cpu", c, init, micro, 2, kSteps);
    expect_ranks_identical(gpu);
    expect_ranks_identical(cpu);
    for (int s = 0; s < kSteps; ++s) {
      std::printf("  [%s] step %d loss cpu %.5f gpu %.5f  rank-0 norm cpu %.4f gpu %.4f\n", stack.c_str(), s,
                  cpu[0].losses[s], gpu[0].losses[s], cpu[0].grad_norms[s], gpu[0].grad_norms[s]);
      EXPECT_NEAR(gpu[0].losses[s], cpu[0].losses[s], 0.05 * cpu[0].losses[s]) << "step " << s;
    }
    EXPECT_LE(std::fabs(gpu[0].losses[0] - cpu[0].losses[0]), kMeanLossTol);
    // Each rank's norm: global (averaged gradients) for s691, local under Parallel Muon.
    for (int r = 0; r < 2; ++r) EXPECT_NEAR(gpu[r].grad_norms[0], cpu[r].grad_norms[0], kGradTol * cpu[r].grad_norms[0]);
    EXPECT_LT(gpu[0].losses.back(), gpu[0].losses.front() - 0.1);
  }
}

}  // namespace
}  // namespace pgolf::test
