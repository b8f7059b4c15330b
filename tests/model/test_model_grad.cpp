// The whole model's backward against finite differences in fp64 (tolerance: cpu/fd_check.h), for a
// tiny model of every stack with all its features on, with cu_seqlens cut mid-row, and with per-row
// LoRA adapters on a frozen base.
#include <gtest/gtest.h>

#include "cpu/fd_check.h"
#include "tiny_models.h"

using namespace pgolf;

namespace {

// Checks every parameter tensor: the largest and some random entries of each (fd_check.h).
void check_all_param_grads(const std::string& stack, bool looping, bool packed) {
  CpuModel<double> model(test::tiny_config(stack));
  test::perturbed_init(model, 11);
  model.set_looping(looping);
  const Batch batch = test::tiny_batch(model.config().vocab_size, packed);
  model.zero_grad();
  model.forward(batch);
  model.backward();
  Rng rng(3);
  for (size_t i = 0; i < model.params().layout().size(); ++i) {
    const std::string& name = model.params().layout().spec(i).name;
    auto p = model.params()[i];
    auto g = model.grads()[i];
    std::vector<double> analytic(g.begin(), g.end());
    test::expect_gradient_matches(stack + " " + name, p, analytic, [&] { return model.forward(batch); },
                                  test::sample_indices(analytic, 4, rng));
  }
}

}  // namespace

TEST(ModelGrad, Baseline) { check_all_param_grads("baseline", false, false); }
TEST(ModelGrad, S691BigramSmearVeXsaNtkRope) { check_all_param_grads("s691", false, false); }
TEST(ModelGrad, S562ValueResidualGatedAttention) { check_all_param_grads("s562", false, false); }
TEST(ModelGrad, S562TrigramHash) { check_all_param_grads("s562_trigram", false, false); }
TEST(ModelGrad, S600BranchGatesDirectBigram) { check_all_param_grads("s600", false, false); }
TEST(ModelGrad, S1560LoopingLanesSkipGatesPackedSegments) { check_all_param_grads("s1560", true, true); }
TEST(ModelGrad, S1560PlainPlanDenseRows) { check_all_param_grads("s1560", false, false); }
TEST(ModelGrad, S691PackedSegments) { check_all_param_grads("s691", false, true); }

TEST(ModelGrad, LoraAdaptersOnFrozenBase) {
  for (bool looping : {true, false}) {
    CpuModel<double> model(test::tiny_config("s1560"));
    test::perturbed_init(model, 12);
    model.set_looping(looping);
    model.set_frozen_base(true);
    LoraConfig lc;
    lc.rank = 3;
    lc.targets = {true, true, true, true, true, true};
    LoraAdapters<double> lora(model.config(), lc, 2, model.num_virtual_layers());
    Rng init(5);
    lora.reset(init);
    for (auto& x : lora.params()) x += 0.2 * init.normal();  // B = 0 after reset: make every path live
    model.set_lora(&lora);
    const Batch batch = test::tiny_batch(model.config().vocab_size, false);
    model.zero_grad();
    lora.zero_grad();
    model.forward(batch);
    // TTT's loss: per-document mean over a chunk of positions, masked per document.
    std::vector<double> w(static_cast<size_t>(batch.tokens()), 0.0);
    for (int t = 4; t < 10; ++t) w[static_cast<size_t>(t)] = 1.0 / 6;
    for (int t = 12 + 2; t < 12 + 8; ++t) w[static_cast<size_t>(t)] = 0.5 / 6;
    model.backward(w);
    auto loss = [&] {
      model.forward(batch);
      double s = 0;
      for (size_t i = 0; i < w.size(); ++i) s += w[i] * model.token_losses()[i];
      return s;
    };
    std::vector<double> analytic(lora.grads().begin(), lora.grads().end());
    Rng rng(9);
    auto params = lora.params();
    test::expect_gradient_matches(looping ? "LoRA (looping)" : "LoRA (plain)", params, analytic, loss,
                                  test::sample_indices(analytic, 60, rng));
    for (double g : model.grads().all()) ASSERT_EQ(g, 0.0) << "a frozen base must get no gradient";
  }
}
