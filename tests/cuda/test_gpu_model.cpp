// GpuModel against CpuModel<double> (tolerances: gpu_model_check.h): the five golden configurations
// on the golden parameters and batches (head dim 16: the reference attention path), tiny models of every
// stack with all features on (head dim 8: reference attention) and with head dim 64 (the flash
// attention kernels), dense rows and segments cut mid-row, looping on and off; then the modes: late
// QAT, eval mode, per-token loss weights, gradient accumulation, per-row LoRA on a frozen base.
#include <gtest/gtest.h>

#include <cstring>

#include "core/safetensors.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mlp_gemm.h"
#include "cuda_test_util.h"
#include "gpu_model_check.h"
#include "model/golden_config.h"
#include "model/init.h"
#include "model/tiny_models.h"
#include "tiny64.h"

namespace pgolf::test {
namespace {

class GpuModelTest : public CudaTest {};

ParamSet<double> perturbed_params(const ModelConfig& cfg, uint64_t seed) {
  CpuModel<double> model(cfg);
  perturbed_init(model, seed);
  return model.params();
}

// ---- golden configurations ------------------------------------------------------------------------

class GpuGolden : public GpuModelTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(GpuGolden, MatchesCpuModelOnGoldenWeights) {
  const std::string stack = GetParam();
  const ModelConfig cfg = golden_model_config(stack);
  const TensorMap g = load_safetensors(golden_dir() / (stack + ".safetensors"));
  ParamSet<double> params(ParamLayout(param_specs(cfg)));
  params.load_tensors(g, stack + ".safetensors");
  const bool s1560 = stack == "s1560";
  ModelRunOptions opt;
  opt.looping = s1560;
  expect_gpu_matches_cpu("golden " + stack, cfg, params, golden_batch(g, s1560), opt);
}

INSTANTIATE_TEST_SUITE_P(Stacks, GpuGolden, ::testing::Values("base", "s691", "s562", "s600", "s1560"));

// ---- tiny models -------------------------------------------------------------------------------------

struct TinyCase {
  std::string stack;
  bool head_dim_64, looping, packed;
};

std::string tiny_case_name(const TinyCase& c) {
  return c.stack + (c.head_dim_64 ? "_dh64" : "_dh8") + (c.looping ? "_looping" : "") + (c.packed ? "_packed" : "");
}
std::string tiny_name(const ::testing::TestParamInfo<TinyCase>& info) { return tiny_case_name(info.param); }
void PrintTo(const TinyCase& c, std::ostream* os) { *os << tiny_case_name(c); }

class GpuTiny : public GpuModelTest, public ::testing::WithParamInterface<TinyCase> {};

TEST_P(GpuTiny, MatchesCpuModel) {
  const TinyCase c = GetParam();
  const ModelConfig cfg = c.head_dim_64 ? tiny64_config(c.stack) : tiny_config(c.stack);
  const Batch batch = c.head_dim_64 ? batch64(cfg.vocab_size, c.packed, 17) : tiny_batch(cfg.vocab_size, c.packed);
  ModelRunOptions opt;
  opt.looping = c.looping;
  expect_gpu_matches_cpu(tiny_case_name(c), cfg, perturbed_params(cfg, 21), batch, opt);
}

INSTANTIATE_TEST_SUITE_P(
    Stacks, GpuTiny,
    ::testing::Values(TinyCase{"baseline", false, false, false}, TinyCase{"s691", false, false, false},
                      TinyCase{"s691", false, false, true}, TinyCase{"s562", false, false, false},
                      TinyCase{"s562_trigram", false, false, false}, TinyCase{"s600", false, false, false},
                      TinyCase{"s1560", false, true, true}, TinyCase{"s1560", false, false, false},
                      TinyCase{"baseline", true, false, false}, TinyCase{"s691", true, false, false},
                      TinyCase{"s691", true, false, true}, TinyCase{"s562", true, false, true},
                      TinyCase{"s562_trigram", true, false, false}, TinyCase{"s600", true, false, false},
                      TinyCase{"s1560", true, true, true}, TinyCase{"s1560", true, false, false}),
    tiny_name);

// ---- modes ------------------------------------------------------------------------------------------

// Programmatic dependent launch of the row kernels (launch.cuh) keeps the stream's order: with it on, a
// deterministic forward and two accumulating backward passes give the bits they give with it off, on the
// tiny models of every stack and on full-width s691 (16 rows of 2048 tokens, where the kernels are long
// enough for a dependent to be scheduled while its predecessor still runs), eagerly and with the second
// pass from a graph.
TEST_F(GpuModelTest, ProgrammaticLaunchKeepsTheBits) {
  struct Result {
    std::vector<float> grads, losses;
  };
  auto run = [](const ModelConfig& cfg, const ParamSet<float>& params, const Batch& batch, bool looping, bool pdl,
                bool graph) {
    cuda::set_programmatic_launch(pdl);
    cuda::GpuModelOptions o;
    o.max_tokens = batch.tokens();
    o.deterministic = true;
    cuda::GpuModel gpu(cfg, o);
    gpu.load_params(params);
    gpu.set_looping(looping);
    gpu.zero_grad();
    for (int pass = 0; pass < 2; ++pass) {
      gpu.set_batch(batch);
      if (!graph || pass == 0) {  // the first pass eagerly: lazy set-up (GEMM plans) outside any capture
        gpu.forward();
        gpu.backward();
        continue;
      }
      cudaGraph_t g = nullptr;
      cudaGraphExec_t exec = nullptr;
      PG_CUDA_CHECK(cudaStreamBeginCapture(gpu.stream(), cudaStreamCaptureModeThreadLocal));
      gpu.forward();
      gpu.backward();
      PG_CUDA_CHECK(cudaStreamEndCapture(gpu.stream(), &g));
      PG_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
      PG_CUDA_CHECK(cudaGraphLaunch(exec, gpu.stream()));
      PG_CUDA_CHECK(cudaStreamSynchronize(gpu.stream()));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(g);
    }
    Result r;
    r.losses = gpu.token_losses();
    ParamSet<float> grads(gpu.layout());
    gpu.store_grads(grads);
    r.grads.assign(grads.all().begin(), grads.all().end());
    cuda::set_programmatic_launch(true);
    return r;
  };
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  struct Case {
    std::string name;
    ModelConfig cfg;
    Batch batch;
    bool looping;
  };
  std::vector<Case> cases;
  for (const std::string stack : {"baseline", "s691", "s562", "s600", "s1560"})
    cases.push_back({stack + " tiny", tiny64_config(stack), batch64(128, true, 71), stack == "s1560"});
  const ModelConfig full = ModelConfig::from_config(Config::load("s691"));
  cases.push_back({"s691 full width", full, random_rows(full.vocab_size, 16, 2048, 72), false});
  for (const Case& c : cases) {
    CpuModel<float> init(c.cfg);
    perturbed_init(init, 73);
    for (const bool graph : {false, true}) {
      const Result off = run(c.cfg, init.params(), c.batch, c.looping, false, graph);
      const Result on = run(c.cfg, init.params(), c.batch, c.looping, true, graph);
      EXPECT_TRUE(same_bits(off.grads, on.grads)) << c.name << (graph ? " (graph)" : "") << ": gradients differ";
      EXPECT_TRUE(same_bits(off.losses, on.losses)) << c.name << (graph ? " (graph)" : "") << ": losses differ";
      double norm = 0;
      for (float g : on.grads) norm += static_cast<double>(g) * g;
      EXPECT_GT(norm, 0.0) << c.name << ": no gradient at all";
    }
  }
}

// The QKV product with QK-norm + RoPE in its epilogue (GpuModelOptions::qkv_product fused) against cuBLASLt and
// the separate pass, at full width (the only width it serves): s691 (RoPE on 16 of 64), baseline (on all
// 64) and s1560 looping, forward and backward in train mode. The kernel test (MlpGemmTest) shows that
// q, k and the rstds are the separate pass's bits on the product it computes; here the product's
// summation order (the same as cuBLASLt's where both run the k-steps in order, as on the H100) may only
// move the losses and gradients by rounding noise, where a wrong head, position or column would move
// them by their own size.
TEST_F(GpuModelTest, FusedQkvProductMatchesTheSeparatePasses) {
  struct Result {
    std::vector<float> grads, losses;
  };
  auto run = [](const ModelConfig& cfg, const ParamSet<float>& params, const Batch& batch, bool looping, bool fused) {
    cuda::GpuModelOptions o;
    o.max_tokens = batch.tokens();
    o.deterministic = true;
    o.qkv_product = fused ? cuda::QkvProduct::fused : cuda::QkvProduct::separate;
    cuda::GpuModel gpu(cfg, o);
    gpu.load_params(params);
    gpu.set_looping(looping);
    gpu.zero_grad();
    gpu.set_batch(batch);
    gpu.forward();
    gpu.backward();
    Result r;
    r.losses = gpu.token_losses();
    ParamSet<float> grads(gpu.layout());
    gpu.store_grads(grads);
    r.grads.assign(grads.all().begin(), grads.all().end());
    return r;
  };
  for (const std::string stack : {"s691", "baseline", "s1560"}) {
    SCOPED_TRACE(stack);
    const ModelConfig cfg = ModelConfig::from_config(Config::load(stack));
    ASSERT_TRUE(cuda::qkv_fused_supported(cfg.model_dim, cuda::QkShape{0, 1, cfg.num_heads, cfg.num_kv_heads,
                                                                        cfg.head_dim, cfg.rope_dims}));
    CpuModel<float> init(cfg);
    perturbed_init(init, 81);
    const Batch batch = random_rows(cfg.vocab_size, 2, 1024, 82);
    const Result off = run(cfg, init.params(), batch, stack == "s1560", false);
    const Result on = run(cfg, init.params(), batch, stack == "s1560", true);
    ASSERT_EQ(off.losses.size(), on.losses.size());
    ASSERT_EQ(off.grads.size(), on.grads.size());
    double loss_off = 0, loss_on = 0, diff2 = 0, norm2 = 0;
    for (size_t i = 0; i < on.losses.size(); ++i) loss_off += off.losses[i], loss_on += on.losses[i];
    for (size_t i = 0; i < on.grads.size(); ++i) {
      const double d = static_cast<double>(on.grads[i]) - off.grads[i];
      diff2 += d * d;
      norm2 += static_cast<double>(off.grads[i]) * off.grads[i];
    }
    EXPECT_NEAR(loss_on / on.losses.size(), loss_off / off.losses.size(), 1e-3 * std::fabs(loss_off / off.losses.size()));
    EXPECT_GT(norm2, 0.0);
    EXPECT_LT(std::sqrt(diff2 / norm2), 2e-2) << "gradients moved by more than rounding noise";
  }
}

// cuda_bf16_norm_grads = false: every norm gradient fp32 (the engine before bf16 norm gradients), against
// the reference without that rounding, on GpuTiny's head-dim-64 s691 and s1560 cases.
TEST_F(GpuModelTest, Fp32NormGradients) {
  ModelRunOptions opt;
  opt.bf16_norm_grads = false;
  for (const TinyCase& c : {TinyCase{"s691", true, false, true}, TinyCase{"s1560", true, true, true}}) {
    const ModelConfig cfg = tiny64_config(c.stack);
    opt.looping = c.looping;
    expect_gpu_matches_cpu(tiny_case_name(c) + " fp32 norm gradients", cfg, perturbed_params(cfg, 21),
                           batch64(cfg.vocab_size, c.packed, 17), opt);
  }
}

// A selective eval forward (Batch::losses_from) stores only the activations it reads itself: no MLP pre
// (the fused kernel's, full-width s691), no skip outputs, layer outputs only where a decoder skip reads
// them. It must therefore read nothing it did not write in the same forward: on a fresh model, and on a
// model whose buffers hold another batch's activations, it gives the same bits. Tiny s691 (U-Net skips,
// the residual fold, unfused MLP) and full-width s691 (fused MLP) in eval mode, eagerly.
TEST_F(GpuModelTest, SelectiveForwardReadsOnlyWhatItWrites) {
  struct Case {
    std::string name;
    ModelConfig cfg;
    int64_t rows, seq_len;
  };
  const std::vector<Case> cases = {{"s691 tiny", tiny64_config("s691"), 2, 80},
                                   {"s691 full width", ModelConfig::from_config(Config::load("s691")), 4, 512}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    CpuModel<float> init(c.cfg);
    perturbed_init(init, 91);
    Batch selected = random_rows(c.cfg.vocab_size, c.rows, c.seq_len, 92);
    selected.losses_from.assign(static_cast<size_t>(c.rows), static_cast<int32_t>(c.seq_len - 16));
    selected.losses_from[0] = 0;  // a first window: every position
    const Batch other = random_rows(c.cfg.vocab_size, c.rows, c.seq_len, 93);
    auto model = [&] {
      cuda::GpuModelOptions o;
      o.max_tokens = c.rows * c.seq_len;
      auto gpu = std::make_unique<cuda::GpuModel>(c.cfg, o);
      gpu->load_params(init.params());
      gpu->set_train(false);
      return gpu;
    };
    auto fresh = model();
    fresh->set_batch(selected);
    ASSERT_EQ(fresh->selected_rows(), c.seq_len + (c.rows - 1) * 16);
    fresh->forward();
    const std::vector<float> first = fresh->token_losses();
    auto used = model();
    used->set_batch(other);
    used->forward();  // every activation buffer now holds the other batch's values
    used->set_batch(selected);
    used->forward();
    const std::vector<float> again = used->token_losses();
    ASSERT_EQ(first.size(), again.size());
    EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float)))
        << "the selective forward read a buffer it did not write";
    EXPECT_THROW((void)used->layer_output(0), Error);
    int64_t scored = 0;
    for (float l : again) scored += std::isfinite(l) ? 1 : 0;
    EXPECT_EQ(scored, used->selected_rows());
  }
}

TEST_F(GpuModelTest, LateQatInTrainModeOnly) {
  const ModelConfig cfg = tiny64_config("s691");
  const ParamSet<double> params = perturbed_params(cfg, 31);
  const Batch batch = batch64(cfg.vocab_size, false, 32);
  ModelRunOptions opt;
  opt.qat = true;
  expect_gpu_matches_cpu("qat train", cfg, params, batch, opt);
  opt.train = false;
  expect_gpu_matches_cpu("qat eval (off)", cfg, params, batch, opt);
}

// Σ w_i·loss_i with TTT-like weights, and two backward calls accumulating into the gradients.
TEST_F(GpuModelTest, TokenWeightsAndGradientAccumulation) {
  const ModelConfig cfg = tiny64_config("s562");
  const ParamSet<double> params = perturbed_params(cfg, 41);
  const Batch batch = batch64(cfg.vocab_size, true, 42);
  std::vector<double> w(static_cast<size_t>(batch.tokens()), 0.0);
  for (int t = 10; t < 40; ++t) w[static_cast<size_t>(t)] = 1.0 / 30;
  for (int t = 90; t < 130; ++t) w[static_cast<size_t>(t)] = 0.5 / 40;
  CpuModel<double> ref(cfg);
  ref.params() = params;
  ref.set_bf16_norm_grads(true);  // as GpuModel (gpu_model_check.h)
  ref.zero_grad();
  ref.forward(batch);
  ref.backward(w);
  ref.forward(batch);
  ref.backward(w);

  cuda::GpuModel gpu(cfg, cuda::GpuModelOptions{batch.tokens()});
  gpu.load_params(params.cast<float>());
  gpu.zero_grad();
  const std::vector<float> wf(w.begin(), w.end());
  for (int pass = 0; pass < 2; ++pass) {
    gpu.set_batch(batch);
    gpu.forward();
    gpu.backward(wf);
  }
  EXPECT_THROW(gpu.backward(wf), Error) << "a second backward of one forward must be refused";
  ParamSet<float> grads(gpu.layout());
  gpu.store_grads(grads);
  double worst = 0;
  for (size_t i = 0; i < grads.layout().size(); ++i) {
    const double e = rel_frobenius(grads[i], ref.grads()[i]);
    EXPECT_LE(e, kGradTol) << "accumulated weighted gradient of " << grads.layout().spec(i).name;
    worst = std::max(worst, e);
  }
  std::printf("  [weighted x2] worst gradient rel error %.2e\n", worst);
}

// Per-row adapters on every target, frozen base (no base gradient), looping plan and the plain one.
TEST_F(GpuModelTest, LoraAdaptersOnFrozenBase) {
  for (const bool looping : {true, false}) {
    SCOPED_TRACE(looping ? "looping" : "plain");
    const ModelConfig cfg = tiny64_config("s1560");
    CpuModel<double> ref(cfg);
    perturbed_init(ref, 51);
    ref.set_looping(looping);
    ref.set_frozen_base(true);
    ref.set_bf16_norm_grads(true);  // as GpuModel (gpu_model_check.h): no effect where every target has an adapter
    LoraConfig lc;
    lc.rank = 8;
    lc.targets = {true, true, true, true, true, true};
    const Batch batch = batch64(cfg.vocab_size, false, 52);
    LoraAdapters<double> lora(cfg, lc, batch.rows, ref.num_virtual_layers());
    Rng init(53);
    lora.reset(init);
    for (auto& x : lora.params()) x += 0.05 * init.normal();  // B = 0 after reset: make every path live
    ref.set_lora(&lora);
    std::vector<double> w(static_cast<size_t>(batch.tokens()), 0.0);
    for (int t = 20; t < 60; ++t) w[static_cast<size_t>(t)] = 1.0 / 40;
    for (int t = 80 + 30; t < 80 + 70; ++t) w[static_cast<size_t>(t)] = 1.0 / 40;
    ref.zero_grad();
    lora.zero_grad();
    ref.forward(batch);
    ref.backward(w);
    // The bf16 floor (gpu_model_check.h): fp32 CPU model and adapters on bf16-rounded values.
    CpuModel<float> floor_model(cfg);
    floor_model.params() = ref.params().cast<float>();
    for (float& x : floor_model.params().all()) x = round_to_bf16(x);
    floor_model.set_looping(looping);
    floor_model.set_frozen_base(true);
    LoraAdapters<float> floor_lora(cfg, lc, batch.rows, ref.num_virtual_layers());
    for (size_t i = 0; i < floor_lora.params().size(); ++i)
      floor_lora.params()[i] = round_to_bf16(static_cast<float>(lora.params()[i]));
    floor_model.set_lora(&floor_lora);
    floor_lora.zero_grad();
    floor_model.forward(batch);
    floor_model.backward(std::vector<float>(w.begin(), w.end()));

    cuda::GpuModel gpu(cfg, cuda::GpuModelOptions{batch.tokens()});
    gpu.load_params(ref.params().cast<float>());
    gpu.set_looping(looping);
    gpu.set_frozen_base(true);
    cuda::GpuLora glora(cfg, lc, batch.rows, gpu.num_virtual_layers(), batch.seq_len);
    const std::vector<float> lp(lora.params().begin(), lora.params().end());
    glora.upload(lp);
    glora.zero_grad();
    gpu.set_lora(&glora);
    gpu.zero_grad();
    gpu.set_batch(batch);
    gpu.forward();
    const double e_losses = rel_frobenius(gpu.token_losses(), ref.token_losses());
    gpu.backward(std::vector<float>(w.begin(), w.end()));
    const std::vector<float> got = glora.download_grads();
    double worst = 0;
    for (LoraTarget t : {LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O, LoraTarget::Mlp, LoraTarget::Head}) {
      for (int slot = 0; slot < (t == LoraTarget::Head ? 1 : ref.num_virtual_layers()); ++slot) {
        const auto* a = lora.find(t, slot);
        // This adapter's A rows (strided in a q/k/v/o group), then its B.
        for (const auto& [offset, per_row, stride] :
             {std::tuple{a->a_offset, lc.rank * a->in, a->a_stride},
              std::tuple{a->b_offset, a->out * lc.rank, a->out * lc.rank}}) {
          const auto gather = [&](const auto& all) {
            std::vector<double> out;
            for (int64_t row = 0; row < batch.rows; ++row)
              for (int64_t k = 0; k < per_row; ++k) out.push_back(all[static_cast<size_t>(offset + row * stride + k)]);
            return out;
          };
          const std::vector<double> g = gather(got), r = gather(lora.grads());
          const double e = rel_frobenius(g, r);
          const double floor = rel_frobenius(gather(floor_lora.grads()), r);
          EXPECT_LE(e, grad_bound(floor)) << "LoRA target " << static_cast<int>(t) << " slot " << slot
                                          << " (bf16 floor " << floor << ")";
          worst = std::max(worst, e);
        }
      }
    }
    EXPECT_LE(e_losses, kTokenLossTol);
    ParamSet<float> base(gpu.layout());
    gpu.store_grads(base);
    for (float x : base.all()) ASSERT_EQ(x, 0.f) << "a frozen base must get no gradient";
    // Overwriting gradients (the engine's LoRA steps): a second backward without zeroing gives the
    // same gradients, not twice them (every adapter is written once per backward).
    glora.set_overwrite_grads(true);
    gpu.set_batch(batch);
    gpu.forward();
    gpu.backward(std::vector<float>(w.begin(), w.end()));
    EXPECT_LE(rel_frobenius(glora.download_grads(), got), 1e-3) << "overwritten gradients";
    std::printf("  [lora %s] token losses rel %.2e, worst adapter gradient rel %.2e\n", looping ? "looping" : "plain",
                e_losses, worst);
  }
}

// LoRA's weight-gradient products on the side stream (dA, dB, joined at the end of each backward part), and
// the head's dz formed by the forward (forward_for_backward with the token weights set first): the same
// operations on the same inputs, so with the deterministic kernels every loss and adapter gradient has the
// same bits as the plain forward and backward. The tiny s1560 stack has the q/k/v/o group and the MLP and
// head adapters, plain and looping.
TEST_F(GpuModelTest, LoraSideStreamAndFusedHeadKeepTheBits) {
  for (const bool looping : {false, true}) {
    SCOPED_TRACE(looping ? "looping" : "plain");
    const ModelConfig cfg = tiny64_config("s1560");
    CpuModel<float> init_model(cfg);
    perturbed_init(init_model, 61);
    LoraConfig lc;
    lc.rank = 8;
    lc.targets = {true, true, true, true, true, true};
    const Batch batch = batch64(cfg.vocab_size, false, 62);
    std::vector<float> w(static_cast<size_t>(batch.tokens()), 0.f);
    for (int t = 20; t < 60; ++t) w[static_cast<size_t>(t)] = 1.f / 40;
    for (int t = 80 + 30; t < 80 + 70; ++t) w[static_cast<size_t>(t)] = 1.f / 40;
    std::vector<float> lora_values;
    std::vector<float> losses[3], grads[3];
    for (int combo = 0; combo < 3; ++combo) {  // plain, side stream, dz in the forward
      cuda::GpuModelOptions options{batch.tokens()};
      options.deterministic = true;
      options.lora_side_stream = combo == 1;
      cuda::GpuModel gpu(cfg, options);
      gpu.load_params(init_model.params());
      gpu.set_looping(looping);
      gpu.set_frozen_base(true);
      cuda::GpuLora glora(cfg, lc, batch.rows, gpu.num_virtual_layers(), batch.seq_len);
      if (lora_values.empty()) {
        lora_values.resize(static_cast<size_t>(glora.total()));
        Rng rng(63);
        for (float& x : lora_values) x = static_cast<float>(0.05 * rng.normal());  // every path live (B != 0)
      }
      glora.upload(lora_values);
      glora.zero_grad();
      gpu.set_lora(&glora);
      gpu.zero_grad();
      gpu.set_batch(batch);
      if (combo == 2) {
        gpu.set_token_weights(w);
        gpu.forward_for_backward(true);
        EXPECT_THROW(gpu.set_token_weights(w), Error) << "weights after the forward that used them";
        losses[combo] = gpu.token_losses();
        gpu.backward_weighted();
      } else {
        gpu.forward();
        losses[combo] = gpu.token_losses();
        gpu.backward(w);
      }
      grads[combo] = glora.download_grads();
      size_t nonzero = 0;
      for (float g : grads[combo]) nonzero += g != 0.f ? 1 : 0;
      EXPECT_GT(nonzero, grads[combo].size() / 2) << "combo " << combo;
    }
    for (int combo = 1; combo < 3; ++combo) {
      SCOPED_TRACE(combo == 1 ? "side stream" : "dz in the forward");
      ASSERT_EQ(losses[combo].size(), losses[0].size());
      ASSERT_EQ(grads[combo].size(), grads[0].size());
      EXPECT_EQ(std::memcmp(losses[combo].data(), losses[0].data(), losses[0].size() * sizeof(float)), 0) << "losses";
      size_t differ = 0;
      for (size_t i = 0; i < grads[0].size(); ++i)
        differ += std::memcmp(&grads[combo][i], &grads[0][i], sizeof(float)) != 0 ? 1 : 0;
      EXPECT_EQ(differ, 0u) << "of " << grads[0].size() << " adapter gradients";
    }
  }
}

// forward_for_backward forms the logits' gradient in the loss pass (softcap_ce_forward's CeGradient): the
// losses and every gradient are the bits of a plain forward and backward with uniform weights (training,
// tiny stacks, s1560 looping; with token weights: LoraSideStreamAndFusedHeadKeepTheBits). Misuse is refused.
TEST_F(GpuModelTest, HeadGradientInTheForwardKeepsTheBits) {
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  for (const std::string stack : {"baseline", "s691", "s1560"}) {
    SCOPED_TRACE(stack);
    const ModelConfig cfg = tiny64_config(stack);
    CpuModel<float> init(cfg);
    perturbed_init(init, 81);
    const Batch batch = batch64(128, true, 82);
    std::vector<float> losses[2], grads[2];
    for (int fused = 0; fused < 2; ++fused) {
      cuda::GpuModelOptions o{batch.tokens()};
      o.deterministic = true;
      cuda::GpuModel gpu(cfg, o);
      gpu.load_params(init.params());
      gpu.set_looping(stack == "s1560");
      gpu.zero_grad();
      gpu.set_batch(batch);
      if (fused) {
        gpu.forward_for_backward(false);
        EXPECT_THROW(gpu.logits(), Error) << "the logits hold their gradient";
      } else {
        gpu.forward();
      }
      losses[fused] = gpu.token_losses();
      gpu.backward();
      ParamSet<float> g(gpu.layout());
      gpu.store_grads(g);
      grads[fused].assign(g.all().begin(), g.all().end());
      if (fused) {  // a weighted backward after a forward for uniform weights
        gpu.forward_for_backward(false);
        EXPECT_THROW(gpu.backward_weighted(), Error);
      }
    }
    EXPECT_TRUE(same_bits(losses[0], losses[1])) << "losses";
    EXPECT_TRUE(same_bits(grads[0], grads[1])) << "gradients";
  }
}

// GpuLora::draw makes LoraAdapters::reset's values on the device, bit for bit (the engines' TTT starts
// from the same adapters), also after other values were there; copy_params_from moves them exactly.
TEST_F(GpuModelTest, LoraDrawOnTheDeviceIsTheHostDraw) {
  const ModelConfig cfg = tiny64_config("s1560");
  LoraConfig lc;
  lc.rank = 16;
  lc.targets = {true, false, true, true, true, true};  // K off: its slots are skipped in the draw order
  const int64_t rows = 5;
  const int slots = 7;
  LoraAdapters<float> host(cfg, lc, rows, slots);
  Rng rng(0xfeedull);
  host.reset(rng);
  const std::vector<float> want(host.params().begin(), host.params().end());
  cuda::GpuLora glora(cfg, lc, rows, slots, 64);
  std::vector<float> noise(want.size());
  Rng other(3);
  for (float& x : noise) x = static_cast<float>(other.normal());
  glora.upload(noise);
  glora.draw(0xfeedull, nullptr);
  std::vector<float> got(want.size());
  glora.download_params(got);
  int64_t differ = 0, nonzero = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    differ += std::memcmp(&got[i], &want[i], sizeof(float)) != 0 ? 1 : 0;
    nonzero += want[i] != 0.f ? 1 : 0;
  }
  EXPECT_EQ(differ, 0) << "of " << want.size() << " values";
  EXPECT_GT(nonzero, static_cast<int64_t>(want.size() / 4)) << "the A matrices are drawn";
  cuda::GpuLora wider(cfg, lc, rows, slots, 128);
  wider.copy_params_from(glora, nullptr);
  std::vector<float> moved(want.size());
  wider.download_params(moved);
  EXPECT_EQ(std::memcmp(moved.data(), want.data(), want.size() * sizeof(float)), 0);
  cuda::GpuLora fewer_rows(cfg, lc, rows - 1, slots, 64);
  EXPECT_THROW(fewer_rows.copy_params_from(glora, nullptr), Error);
}

TEST_F(GpuModelTest, BatchLargerThanTheArenaIsAnError) {
  const ModelConfig cfg = tiny_config("baseline");
  cuda::GpuModel gpu(cfg, cuda::GpuModelOptions{12});
  EXPECT_THROW(gpu.set_batch(tiny_batch(cfg.vocab_size, false)), Error);
  EXPECT_THROW(gpu.forward(), Error) << "no batch was set";
}

}  // namespace
}  // namespace pgolf::test
