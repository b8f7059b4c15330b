// One optimizer step of the reference scripts (golden/README "One optimizer step"): from the dumped
// parameters and gradients, at the step-0 schedule (lr scale 1, Muon momentum 0.92) after clipping
// at 0.3, the step must reproduce `step1/*` (scripts' bf16 Newton–Schulz) and, with fp32 Muon,
// `step1_muon_fp32/*`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "golden_stack.h"
#include "optim/clip.h"
#include "optim/optimizer.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

// The step-0 schedule of the golden step.
constexpr double kLrScale = 1.0;
constexpr double kMomentum = 0.92;

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// Root-mean-square difference over the given parameters.
double rms_diff(const ParamSet<float>& a, const ParamSet<float>& b, const std::vector<size_t>& members) {
  double sum_sq = 0.0;
  int64_t n = 0;
  for (size_t i : members) {
    for (size_t k = 0; k < a[i].size(); ++k) {
      const double d = static_cast<double>(a[i][k]) - b[i][k];
      sum_sq += d * d;
    }
    n += static_cast<int64_t>(a[i].size());
  }
  return std::sqrt(sum_sq / static_cast<double>(n));
}

struct StepResult {
  ParamSet<float> params;
  double grad_norm;
  Optimizer optimizer;
};

StepResult run_golden_step(const test::GoldenStack& g, const std::string& ns_dtype) {
  Config c = g.config;
  c.set("muon_ns_dtype", ns_dtype);
  ParamSet<float> params = test::golden_params(g, "");
  ParamSet<float> grads = test::golden_params(g, "grad/");
  const double norm = clip_grad_norm(grads.all(), c.get_double("grad_clip_norm"));
  Optimizer opt(g.layout, OptimizerConfig::from_config(c));
  opt.step(params, grads, 0, kLrScale, kMomentum);
  return {std::move(params), norm, std::move(opt)};
}

std::set<std::string> names_of(const ParamLayout& layout, const std::vector<size_t>& members) {
  std::set<std::string> out;
  for (size_t i : members) out.insert(layout.spec(i).name);
  return out;
}

std::set<std::string> json_names(const nlohmann::json& list) {
  std::set<std::string> out;
  for (auto& n : list) out.insert(n.get<std::string>());
  return out;
}

class GoldenStep : public ::testing::TestWithParam<std::string> {};

// The small layout built by the real rules has the golden parameter count and the golden groups.
TEST_P(GoldenStep, LayoutAndGroupsMatchTheReference) {
  const test::GoldenStack g = test::load_golden_stack(GetParam());
  EXPECT_EQ(g.layout.count(), g.meta.at("param_count").get<int64_t>());
  Optimizer opt(g.layout, OptimizerConfig::from_config(g.config));
  const nlohmann::json& groups = g.meta.at("step1").at("groups");
  EXPECT_EQ(names_of(g.layout, opt.members(ParamGroup::Embed)), json_names(groups.at("adamw_tok")));
  EXPECT_EQ(names_of(g.layout, opt.members(ParamGroup::Matrix)), json_names(groups.at("muon")));
  EXPECT_EQ(names_of(g.layout, opt.members(ParamGroup::Scalar)), json_names(groups.at("adamw_scalar")));
  // The preset's own hyperparameters are the ones the golden step used.
  const nlohmann::json& hyper = g.meta.at("step1").at("hyper");
  const Config preset = Config::load(GetParam());
  const OptimizerConfig oc = OptimizerConfig::from_config(preset);
  EXPECT_DOUBLE_EQ(oc.embed.lr, hyper.at("tok_lr").get<double>());
  EXPECT_DOUBLE_EQ(oc.matrix.lr, hyper.at("matrix_lr").get<double>());
  EXPECT_DOUBLE_EQ(oc.scalar.lr, hyper.at("scalar_lr").get<double>());
  EXPECT_DOUBLE_EQ(oc.scalar.weight_decay, hyper.at("adam_wd").get<double>());
  EXPECT_DOUBLE_EQ(oc.matrix.weight_decay, hyper.at("muon_wd").get<double>());
  EXPECT_DOUBLE_EQ(oc.embed.weight_decay, hyper.value("embed_wd", hyper.at("adam_wd").get<double>()));
  EXPECT_EQ(oc.matrix.row_normalize, hyper.value("row_normalize", false));
  EXPECT_DOUBLE_EQ(preset.get_double("grad_clip_norm"), hyper.at("grad_clip_norm").get<double>());
}

TEST_P(GoldenStep, ScriptPrecisionStepMatchesStep1) {
  const test::GoldenStack g = test::load_golden_stack(GetParam());
  const ParamSet<float> before = test::golden_params(g, "");
  const ParamSet<float> expected = test::golden_params(g, "step1/");
  StepResult r = run_golden_step(g, "bf16");

  // The norm is an fp32 reduction in the reference: 1e-6 relative is a few fp32 ulps.
  const double golden_norm = g.meta.at("step1").at("grad_total_norm_before_clip").get<double>();
  EXPECT_NEAR(r.grad_norm, golden_norm, 1e-6 * golden_norm);
  EXPECT_NEAR(clip_coefficient(r.grad_norm, 0.3), g.meta.at("step1").at("clip_coef").get<double>(), 1e-7);

  // AdamW: the fused kernel's arithmetic; the golden README measures CPU vs GPU PyTorch at <= 4.8e-7.
  for (ParamGroup grp : {ParamGroup::Embed, ParamGroup::Scalar}) {
    for (size_t i : r.optimizer.members(grp)) {
      const double d = max_abs_diff(r.params[i], expected[i]);
      EXPECT_LE(d, 5e-7) << g.layout.spec(i).name;
    }
  }
  // Muon in bf16: the scripts' own CPU and GPU runs differ by up to 7.7e-4 (6-8 % of the update)
  // because bf16 rounding depends on the GEMM's accumulation order; README bound: 1e-3 abs or 10 % of
  // the update.
  for (size_t i : r.optimizer.members(ParamGroup::Matrix)) {
    const double update = max_abs_diff(before[i], expected[i]);
    const double d = max_abs_diff(r.params[i], expected[i]);
    EXPECT_TRUE(d <= 1e-3 || d <= 0.1 * update) << g.layout.spec(i).name << ": diff " << d << ", update " << update;
  }
  // The emulation must capture the scripts' bf16 rounding, not just stay inside the bound: it has to
  // be at least twice as close (RMS) to the bf16 step as the same step computed in fp32 is. A wrong
  // operation order (e.g. the other form of c·A·A) or an fp32 momentum in the banked path brings it
  // back to the fp32 distance.
  const auto& muon = r.optimizer.members(ParamGroup::Matrix);
  const double emulated = rms_diff(r.params, expected, muon);
  const double fp32 = rms_diff(run_golden_step(g, "fp32").params, expected, muon);
  EXPECT_LT(emulated, 0.5 * fp32) << "emulated bf16 RMS " << emulated << ", fp32 RMS " << fp32;
}

TEST_P(GoldenStep, Fp32MuonMatchesTheFp32Variant) {
  const test::GoldenStack g = test::load_golden_stack(GetParam());
  const TensorMap variant = load_safetensors(test::golden_dir() / (GetParam() + "_muon_fp32.safetensors"));
  const ParamSet<float> expected_adam = test::golden_params(g, "step1/");
  StepResult r = run_golden_step(g, "fp32");
  for (size_t i : r.optimizer.members(ParamGroup::Matrix)) {
    const std::string& name = g.layout.spec(i).name;
    const auto want = variant.get("step1_muon_fp32/" + name).to_f32();
    // The GEMMs sum in another order than cuBLAS, so the orthogonalised update differs at fp32
    // rounding level (~1e-6 relative); times lr (0.022-0.025) that is far below an ulp of the
    // weights, so what remains is the final rounding of w: the reference's own CPU-vs-GPU gap is
    // 3e-8 (one ulp at |w| in [0.25, 0.5)). 1e-7 allows ~3 such ulps.
    EXPECT_LE(max_abs_diff(r.params[i], want), 1e-7) << name;
  }
  for (ParamGroup grp : {ParamGroup::Embed, ParamGroup::Scalar})
    for (size_t i : r.optimizer.members(grp)) EXPECT_LE(max_abs_diff(r.params[i], expected_adam[i]), 5e-7);
}

INSTANTIATE_TEST_SUITE_P(Stacks, GoldenStep, ::testing::Values("s691", "s1560"));

}  // namespace
