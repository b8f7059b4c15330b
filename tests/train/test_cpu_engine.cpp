#include <gtest/gtest.h>

#include <cmath>

#include "model/init.h"
#include "model/tiny_models.h"
#include "optim/clip.h"
#include "train/cpu_engine.h"

using namespace pgolf;

namespace {

Config tiny_engine_config(const std::string& stack) {
  Config c = test::tiny_preset(stack);
  c.set("grad_clip_norm", 0.3);
  return c;
}

ParamSet<float> perturbed_params(const Config& c, uint64_t seed) {
  CpuModel<float> m(ModelConfig::from_config(c));
  test::perturbed_init(m, seed);
  return m.params();
}

// Row r of `b` (B rows of T) as its own one-row batch.
Batch row_of(const Batch& b, int64_t r) {
  Batch o;
  o.rows = 1;
  o.seq_len = b.seq_len;
  o.inputs.assign(b.inputs.begin() + r * b.seq_len, b.inputs.begin() + (r + 1) * b.seq_len);
  o.targets.assign(b.targets.begin() + r * b.seq_len, b.targets.begin() + (r + 1) * b.seq_len);
  return o;
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

}  // namespace

TEST(CpuEngine, TrainingStepsLowerTheLossOfAFixedBatch) {
  for (std::string stack : {"baseline", "s691", "s1560"}) {
    Config c = tiny_engine_config(stack);
    auto comm = make_single_process_communicator();
    CpuEngine e(c, *comm);
    e.load_params(perturbed_params(c, 3));
    e.set_looping(stack == "s1560");
    Batch b = test::tiny_batch(e.model_config().vocab_size, false);
    double first = 0, last = 0;
    for (int s = 0; s < 8; ++s) {
      StepResult r = e.train_step(std::span<const Batch>(&b, 1), {s, 1.0, 0.9, false});
      EXPECT_GT(r.grad_norm, 0.0);
      if (s == 0) first = r.loss;
      last = r.loss;
    }
    EXPECT_LT(last, first - 0.1) << stack;
  }
}

// Two ranks with one row each equal one rank with gradient accumulation over the two rows (the
// references' rule), up to the order of the gradient reduction.
TEST(CpuEngine, TwoRanksEqualOneRankWithAccumulation) {
  Config c = tiny_engine_config("s691");
  // fp32 Newton-Schulz: with the references' bf16 emulation a 1-ulp gradient difference can flip a
  // bf16 rounding and move a weight by ~1e-3 of the update, which would hide real mistakes.
  c.set("muon_ns_dtype", std::string("fp32"));
  ParamSet<float> init = perturbed_params(c, 5);
  Batch b = test::tiny_batch(64, false);
  Batch rows[2] = {row_of(b, 0), row_of(b, 1)};

  auto single = make_single_process_communicator();
  CpuEngine one(c, *single);
  one.load_params(init);
  std::vector<double> losses_one;
  for (int s = 0; s < 3; ++s) losses_one.push_back(one.train_step(rows, {s, 1.0, 0.9, false}).loss);
  ParamSet<float> p_one(one.layout());
  one.store_params(p_one);

  std::vector<ParamSet<float>> p_ranks(2);
  std::vector<std::vector<double>> losses_ranks(2);
  run_thread_group(2, [&](Communicator& comm) {
    CpuEngine e(c, comm);
    e.load_params(init);
    for (int s = 0; s < 3; ++s)
      losses_ranks[comm.rank()].push_back(e.train_step(std::span<const Batch>(&rows[comm.rank()], 1), {s, 1.0, 0.9, false}).loss);
    e.store_params(p_ranks[comm.rank()]);
  });
  // Every rank holds the same parameters, bit for bit.
  EXPECT_EQ(max_abs_diff(p_ranks[0].all(), p_ranks[1].all()), 0.0);
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(losses_ranks[0][s], losses_ranks[1][s]);
    EXPECT_NEAR(losses_ranks[0][s], losses_one[s], 1e-5 * std::fabs(losses_one[s]));
  }
  // Gradients differ only by the rounding of (g0 + g1)/2 in fp32 vs fp64; three steps of Muon keep
  // that at the 1e-5 level of the weights (|w| ~ 0.1 - 1).
  EXPECT_LT(max_abs_diff(p_ranks[0].all(), p_one.all()), 2e-5);
}

TEST(CpuEngine, TokenLossesAreTheEvalModeForward) {
  Config c = tiny_engine_config("s562");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  e.load_params(perturbed_params(c, 9));
  Batch b = test::tiny_batch(64, false);
  std::vector<float> nll;
  e.token_losses(b, nll);
  CpuModel<double> ref(ModelConfig::from_config(c));
  ParamSet<float> p(e.layout());
  e.store_params(p);
  ref.params() = p.cast<double>();
  ref.set_train(false);
  ref.forward(b);
  ASSERT_EQ(nll.size(), ref.token_losses().size());
  for (size_t i = 0; i < nll.size(); ++i) EXPECT_NEAR(nll[i], ref.token_losses()[i], 2e-5) << i;
}

TEST(CpuEngine, SgdTttStepIsClippedMomentumSgd) {
  Config c = tiny_engine_config("baseline");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  ParamSet<float> p0 = perturbed_params(c, 11);
  e.load_params(p0);
  Batch b = test::tiny_batch(64, false);
  // The gradient the step will use: mean-loss gradient, clipped to norm 1.
  CpuModel<float>& m = e.model();
  m.set_train(true);
  m.zero_grad();
  m.forward(b);
  m.backward();
  std::vector<float> g(m.grads().all().begin(), m.grads().all().end());
  optim::clip_grad_norm(g, 1.0);
  e.ttt_begin({TttOptimizerConfig::Kind::Sgd, 0.01, 0.9});
  e.ttt_step(b, 0.5);
  ParamSet<float> p1(e.layout());
  e.store_params(p1);
  for (size_t i = 0; i < g.size(); ++i) ASSERT_FLOAT_EQ(p1.all()[i], p0.all()[i] - 0.005f * g[i]) << i;
  e.ttt_end();
}

TEST(CpuEngine, TttFreezesTheFirstBlocks) {
  Config c = tiny_engine_config("baseline");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  ParamSet<float> p0 = perturbed_params(c, 12);
  e.load_params(p0);
  Batch b = test::tiny_batch(64, false);
  TttOptimizerConfig cfg;
  cfg.freeze_blocks = 2;
  e.ttt_begin(cfg);
  e.ttt_step(b, 1.0);
  ParamSet<float> p1(e.layout());
  e.store_params(p1);
  for (size_t i = 0; i < p0.layout().size(); ++i) {
    const std::string& n = p0.layout().spec(i).name;
    const bool frozen = n.rfind("blocks.0.", 0) == 0 || n.rfind("blocks.1.", 0) == 0;
    EXPECT_EQ(max_abs_diff(p0[i], p1[i]) == 0.0, frozen) << n;
  }
}

// Fresh adapters have B = 0: the first score equals the base model's; training then changes the
// next forward's losses but never the base weights.
TEST(CpuEngine, LoraScoresWithFreshAdaptersThenLearns) {
  Config c = tiny_engine_config("s1560");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  ParamSet<float> p0 = perturbed_params(c, 13);
  e.load_params(p0);
  e.set_looping(true);
  Batch b = test::tiny_batch(64, false);
  std::vector<float> base;
  e.token_losses(b, base);
  LoraConfig lc;
  lc.rank = 4;
  lc.targets = {true, true, true, true, true, true};
  e.lora_begin(lc, b.rows, {1e-2, 0.9, 0.999, 1e-10, 0.0});
  e.lora_reset(1);
  std::vector<float> weights(static_cast<size_t>(b.tokens()), 1.0f / static_cast<float>(b.tokens()));
  std::vector<float> nll;
  e.lora_score_and_train(b, weights, nll);
  for (size_t i = 0; i < nll.size(); ++i) EXPECT_NEAR(nll[i], base[i], 1e-6) << i;
  double before = 0, after = 0;
  for (float x : nll) before += x;
  e.lora_train_step(b, weights);
  e.lora_score_and_train(b, {}, nll);
  for (float x : nll) after += x;
  EXPECT_LT(after, before);
  ParamSet<float> p1(e.layout());
  e.store_params(p1);
  EXPECT_EQ(max_abs_diff(p0.all(), p1.all()), 0.0);
  e.lora_end();
}

// A step over a batch of fewer rows moves only those rows' adapters: after a 2-row step, a 1-row
// step changes row 0's scores but leaves row 1's exactly as they were (its momentum does not move it).
TEST(CpuEngine, LoraStepMovesOnlyTheBatchRows) {
  Config c = tiny_engine_config("s1560");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  e.load_params(perturbed_params(c, 13));
  e.set_looping(true);
  const Batch two = test::tiny_batch(64, false, 21);
  Batch one = two;  // row 0 of `two`
  one.rows = 1;
  one.inputs.resize(static_cast<size_t>(two.seq_len));
  one.targets.resize(static_cast<size_t>(two.seq_len));
  LoraConfig lc;
  lc.rank = 4;
  lc.targets = {true, true, true, true, true, true};
  const auto uniform = [](const Batch& b) {
    return std::vector<float>(static_cast<size_t>(b.tokens()), 1.0f / static_cast<float>(b.tokens()));
  };
  std::vector<float> nll, before, after;
  e.lora_begin(lc, 2, {1e-2, 0.9, 0.999, 1e-10, 0.1});
  e.lora_reset(5);
  e.lora_score_and_train(two, uniform(two), nll);
  e.lora_train_step(two, uniform(two));
  e.lora_score_and_train(two, {}, before);
  e.lora_score_and_train(one, uniform(one), nll);
  e.lora_score_and_train(two, {}, after);
  const auto T = static_cast<size_t>(two.seq_len);
  double row0_change = 0;
  for (size_t t = 0; t < T; ++t) {
    row0_change += std::fabs(after[t] - before[t]);
    EXPECT_EQ(after[T + t], before[T + t]) << "row 1, token " << t;
  }
  EXPECT_GT(row0_change, 1e-4) << "the 1-row step trains row 0";
  e.lora_end();
}

TEST(CpuEngine, HessiansAreGramMatricesOfTheLinearInputs) {
  Config c = tiny_engine_config("s691");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  e.load_params(perturbed_params(c, 17));
  Batch b = test::tiny_batch(64, false);
  TensorMap h;
  e.accumulate_hessians(b, h);
  const ModelConfig& m = e.model_config();
  EXPECT_EQ(h.size(), static_cast<size_t>(6 * m.num_layers + 1));
  // Spot-check one entry against the explicit sum over tokens of x xᵀ.
  auto in = e.model().linear_inputs(1);
  const int64_t cols = m.model_dim, N = b.tokens();
  auto H = h.get("blocks.1.mlp.fc.weight").as<float>();
  for (int64_t i = 0; i < cols; i += 7)
    for (int64_t j = 0; j < cols; j += 5) {
      double s = 0;
      for (int64_t t = 0; t < N; ++t) s += static_cast<double>(in.fc_in[t * cols + i]) * in.fc_in[t * cols + j];
      EXPECT_NEAR(H[i * cols + j], s, 1e-4 * (1 + std::fabs(s)));
    }
  // q, k and v share the attention input: identical Hessians, as in the references.
  EXPECT_EQ(h.get("blocks.3.attn.c_q.weight").bytes, h.get("blocks.3.attn.c_v.weight").bytes);
}

TEST(CpuEngine, OptimizerStateRoundTripContinuesIdentically) {
  Config c = tiny_engine_config("s691");
  c.set("ema_enabled", true);
  auto comm = make_single_process_communicator();
  Batch b = test::tiny_batch(64, false);
  ParamSet<float> init = perturbed_params(c, 21);

  CpuEngine a(c, *comm);
  a.load_params(init);
  a.init_ema();
  for (int s = 0; s < 2; ++s) a.train_step(std::span<const Batch>(&b, 1), {s, 1.0, 0.9, true});
  TensorMap state = a.optimizer_state();
  ParamSet<float> mid(a.layout());
  a.store_params(mid);
  double la = a.train_step(std::span<const Batch>(&b, 1), {2, 1.0, 0.9, true}).loss;

  CpuEngine r(c, *comm);
  r.load_params(mid);
  r.load_optimizer_state(state, "state");
  double lr = r.train_step(std::span<const Batch>(&b, 1), {2, 1.0, 0.9, true}).loss;
  EXPECT_EQ(la, lr);
  ParamSet<float> pa(a.layout()), pr(r.layout()), ea(a.layout()), er(r.layout());
  a.store_params(pa);
  r.store_params(pr);
  a.store_ema(ea);
  r.store_ema(er);
  EXPECT_EQ(max_abs_diff(pa.all(), pr.all()), 0.0);
  EXPECT_EQ(max_abs_diff(ea.all(), er.all()), 0.0);
}

// Parallel Muon (banked s1560): W ranks with one micro-batch each equal one rank accumulating the W
// micro-batches, for world sizes that need zero-padded bank shards (banks of 10 and 5 slices over
// 3 and 4 ranks; with 4 ranks one rank owns no MLP slice). The gathered optimizer state (momentum of
// every slice) is the same on every rank, bit for bit, and matches the one-rank state.
TEST(CpuEngine, ParallelMuonRanksEqualOneRankWithAccumulation) {
  Config c = tiny_engine_config("s1560");
  c.set("muon_ns_dtype", std::string("fp32"));  // see TwoRanksEqualOneRankWithAccumulation
  c.set("grad_clip_norm", 0.0);                 // local clipping differs from clipping the accumulated gradient
  const ParamSet<float> init = perturbed_params(c, 31);
  for (int world : {3, 4}) {
    SCOPED_TRACE(world);
    std::vector<Batch> micro;
    for (int k = 0; k < world; ++k) micro.push_back(test::tiny_batch(64, true, 40 + k));

    auto single = make_single_process_communicator();
    CpuEngine one(c, *single);
    one.load_params(init);
    one.set_looping(true);
    std::vector<double> losses_one;
    for (int s = 0; s < 3; ++s) losses_one.push_back(one.train_step(micro, {s, 1.0, 0.9, false}).loss);
    ParamSet<float> p_one(one.layout());
    one.store_params(p_one);
    const TensorMap state_one = one.optimizer_state();

    std::vector<ParamSet<float>> p_ranks(world);
    std::vector<TensorMap> states(world);
    std::vector<std::vector<double>> losses(world);
    run_thread_group(world, [&](Communicator& comm) {
      CpuEngine e(c, comm);
      e.load_params(init);
      e.set_looping(true);
      for (int s = 0; s < 3; ++s)
        losses[comm.rank()].push_back(
            e.train_step(std::span<const Batch>(&micro[comm.rank()], 1), {s, 1.0, 0.9, false}).loss);
      e.store_params(p_ranks[comm.rank()]);
      states[comm.rank()] = e.optimizer_state();
    });
    for (int r = 1; r < world; ++r) {
      EXPECT_EQ(max_abs_diff(p_ranks[r].all(), p_ranks[0].all()), 0.0);
      EXPECT_EQ(losses[r], losses[0]);
      for (const std::string& name : states[0].names())
        EXPECT_EQ(states[r].get(name).bytes, states[0].get(name).bytes) << name;
    }
    for (int s = 0; s < 3; ++s) EXPECT_NEAR(losses[0][s], losses_one[s], 1e-5 * losses_one[s]);
    // As in TwoRanksEqualOneRankWithAccumulation: reduction-order rounding, three Muon steps.
    EXPECT_LT(max_abs_diff(p_ranks[0].all(), p_one.all()), 2e-5);
    for (const std::string& name : state_one.names()) {
      if (name.find("momentum_buffer") == std::string::npos) continue;
      // Momentum holds sums of gradients (|g| up to ~1): the same reduction-order rounding.
      EXPECT_LT(max_abs_diff(states[0].get(name).as<float>(), state_one.get(name).as<float>()), 1e-5) << name;
    }
  }
}

// The references' bf16 numerics: bank gradients are reduce-scattered in bf16. Ranks still agree bit
// for bit. Against one rank the bf16 roundings fall differently (the gradient is rounded per rank
// before the reduction), so the bound is FlashAttention's rule: the distributed result may differ
// from the one-rank bf16 result by at most twice the one-rank bf16 result's own distance from the
// fp32 computation.
TEST(CpuEngine, ParallelMuonInBf16KeepsRanksIdentical) {
  Config c = tiny_engine_config("s1560");
  c.set("grad_clip_norm", 0.0);
  const ParamSet<float> init = perturbed_params(c, 33);
  std::vector<Batch> micro = {test::tiny_batch(64, true, 50), test::tiny_batch(64, true, 51)};
  auto one_rank = [&](const Config& cfg) {
    auto single = make_single_process_communicator();
    CpuEngine one(cfg, *single);
    one.load_params(init);
    for (int s = 0; s < 3; ++s) one.train_step(micro, {s, 1.0, 0.9, false});
    ParamSet<float> p(one.layout());
    one.store_params(p);
    return p;
  };
  const ParamSet<float> p_one = one_rank(c);
  Config f32 = c;
  f32.set("muon_ns_dtype", std::string("fp32"));
  const double bf16_error = max_abs_diff(p_one.all(), one_rank(f32).all());
  std::vector<ParamSet<float>> p_ranks(2);
  run_thread_group(2, [&](Communicator& comm) {
    CpuEngine e(c, comm);
    e.load_params(init);
    for (int s = 0; s < 3; ++s) e.train_step(std::span<const Batch>(&micro[comm.rank()], 1), {s, 1.0, 0.9, false});
    e.store_params(p_ranks[comm.rank()]);
  });
  EXPECT_EQ(max_abs_diff(p_ranks[0].all(), p_ranks[1].all()), 0.0);
  EXPECT_GT(bf16_error, 0.0);
  EXPECT_LE(max_abs_diff(p_ranks[0].all(), p_one.all()), 2.0 * bf16_error);
}

// The default pipeline (Engine::submit_* / collect): the NLL of the synchronous calls, in submission
// order, at most kMaxPending waiting; PendingCalls drops what a loop left behind.
TEST(CpuEngine, PipelinedCallsReturnTheSynchronousLossesInOrder) {
  Config c = tiny_engine_config("s691");
  auto comm = make_single_process_communicator();
  CpuEngine e(c, *comm);
  e.load_params(perturbed_params(c, 17));
  const Batch a = test::tiny_batch(e.model_config().vocab_size, false, 3);
  const Batch b = test::tiny_batch(e.model_config().vocab_size, false, 4);
  std::vector<float> want_a, want_b, got;
  e.token_losses(a, want_a);
  e.token_losses(b, want_b);
  ASSERT_NE(want_a, want_b);
  EXPECT_THROW(e.collect(got), Error) << "nothing pending";
  e.submit_token_losses(a);
  e.submit_token_losses(b);
  EXPECT_EQ(e.pending(), 2);
  EXPECT_THROW(e.submit_token_losses(a), Error) << "more than kMaxPending";
  e.collect(got);
  EXPECT_EQ(got, want_a);
  e.collect(got);
  EXPECT_EQ(got, want_b);
  EXPECT_EQ(e.pending(), 0);
  try {
    const PendingCalls drain(e);
    e.submit_token_losses(b);
    throw std::runtime_error("a loop fails with a call pending");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(e.pending(), 0);
}
