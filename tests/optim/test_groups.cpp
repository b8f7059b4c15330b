// Optimizer groups of every full-size preset against the references' construction rule (SPEC §4.1),
// and the per-group hyperparameters resolved from the presets.
#include <gtest/gtest.h>

#include <set>

#include "model/config.h"
#include "optim/optimizer.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

// The reference scripts' rule, restated from their main(): inside `blocks`, a 2-D tensor whose name
// holds no control pattern goes to Muon and everything else to the scalar AdamW; outside `blocks`
// the token embedding and the bigram / value embeddings go to the token AdamW, bigram.proj and
// ve_shared.proj to Muon, the parameter banks (#549/S1560) to Muon, the rest (skip weights and gates,
// smear gate, scales, parallel lambdas) to the scalar AdamW.
ParamGroup reference_group(const ParamSpec& p) {
  static const char* control[] = {"attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear",
                                  "ve_layer_scales", "ve_shared.scale", "skip_gates", "parallel_post_lambdas",
                                  "parallel_resid_lambdas"};
  const std::string& n = p.name;
  if (n.rfind("blocks.", 0) == 0) {
    bool is_control = false;
    for (const char* c : control) is_control = is_control || n.find(c) != std::string::npos;
    return p.shape.size() == 2 && !is_control ? ParamGroup::Matrix : ParamGroup::Scalar;
  }
  if (n == "tok_emb.weight" || n == "bigram.embed.weight" || n == "ve_shared.embed.weight" || n == "bigram_emb.weight")
    return ParamGroup::Embed;
  if (n == "bigram.proj.weight" || n == "ve_shared.proj.weight" || n.ends_with("_bank")) return ParamGroup::Matrix;
  return ParamGroup::Scalar;
}

struct GroupCounts {
  size_t embed, matrix, scalar;
};

class PresetGroups : public ::testing::TestWithParam<std::pair<std::string, GroupCounts>> {};

TEST_P(PresetGroups, FollowTheReferenceRule) {
  const auto& [preset, counts] = GetParam();
  const ParamLayout layout(param_specs(ModelConfig::from_config(Config::load(preset))));
  const Optimizer opt(layout, OptimizerConfig::from_config(Config::load(preset)));
  for (ParamGroup g : {ParamGroup::Embed, ParamGroup::Matrix, ParamGroup::Scalar})
    for (size_t i : opt.members(g)) EXPECT_EQ(g, reference_group(layout.spec(i))) << preset << ": " << layout.spec(i).name;
  EXPECT_EQ(opt.members(ParamGroup::Embed).size(), counts.embed);
  EXPECT_EQ(opt.members(ParamGroup::Matrix).size(), counts.matrix);
  EXPECT_EQ(opt.members(ParamGroup::Scalar).size(), counts.scalar);
  EXPECT_EQ(counts.embed + counts.matrix + counts.scalar, layout.size());
}

// Tensor counts per group: 6 matrices per block (+ S562's attn_gate.weight), plus the side
// projections; scalars: 4 per block (+ vr_lambda, attn_gate.bias, branch gates) plus top-level ones.
INSTANTIATE_TEST_SUITE_P(
    FullSize, PresetGroups,
    ::testing::Values(std::pair{std::string("baseline"), GroupCounts{1, 54, 37}},    // 9*4 + skip_weights
                      std::pair{std::string("s691"), GroupCounts{3, 68, 50}},        // 66 + bigram/ve proj; 44+6
                      std::pair{std::string("s562"), GroupCounts{2, 71, 63}},        // 70 + bigram.proj; 10*6+3
                      std::pair{std::string("s600"), GroupCounts{2, 66, 67}},        // 11*6 + skip_weights
                      std::pair{std::string("s1560"), GroupCounts{1, 4, 48}}),       // 4 banks; 44 + 4
    [](const auto& info) { return info.param.first; });

TEST(OptimizerConfig, ResolvesEachPresetsHyperparameters) {
  const OptimizerConfig base = OptimizerConfig::from_config(Config::load("baseline"));
  EXPECT_DOUBLE_EQ(base.embed.lr, 0.05);  // Adam, no decay
  EXPECT_DOUBLE_EQ(base.embed.weight_decay, 0.0);
  EXPECT_DOUBLE_EQ(base.scalar.lr, 0.04);
  EXPECT_DOUBLE_EQ(base.matrix.lr, 0.04);
  EXPECT_DOUBLE_EQ(base.matrix.weight_decay, 0.0);
  EXPECT_EQ(base.matrix.numerics, MuonNumerics::BF16);

  const OptimizerConfig s691 = OptimizerConfig::from_config(Config::load("s691"));
  EXPECT_DOUBLE_EQ(s691.embed.weight_decay, 0.04);  // embed_wd = -1 falls back to adam_wd
  EXPECT_DOUBLE_EQ(s691.embed.beta2, 0.95);
  EXPECT_DOUBLE_EQ(s691.embed.eps, 1e-8);
  EXPECT_FALSE(s691.matrix.row_normalize);

  const OptimizerConfig s1560 = OptimizerConfig::from_config(Config::load("s1560"));
  EXPECT_DOUBLE_EQ(s1560.embed.weight_decay, 0.085);
  EXPECT_DOUBLE_EQ(s1560.scalar.weight_decay, 0.02);
  EXPECT_DOUBLE_EQ(s1560.matrix.weight_decay, 0.095);
  EXPECT_TRUE(s1560.matrix.row_normalize);
  EXPECT_EQ(s1560.matrix.ns_steps, 5);

  Config c = Config::load("s691");
  c.set("muon_ns_dtype", std::string("fp32"));
  EXPECT_EQ(OptimizerConfig::from_config(c).matrix.numerics, MuonNumerics::F32);
  c.set("muon_ns_dtype", std::string("fp16"));
  EXPECT_THROW(OptimizerConfig::from_config(c), Error);
}

}  // namespace
