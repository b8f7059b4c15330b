// Parameter init (SPEC §3.11): the distributions and every structural value of each stack's rules.
#include <gtest/gtest.h>

#include <cmath>

#include "core/config.h"
#include "model/init.h"
#include "model/params.h"
#include "tiny_models.h"

using namespace pgolf;

namespace {

// A preset at a reduced width (d = 64, so that the orthogonality checks stay fast) and its init.
ParamSet<float> init_preset(const std::string& preset, uint64_t seed = 1234) {
  Config c = Config::load(preset);
  c.set("model_dim", int64_t{64});
  c.set("num_heads", int64_t{4});
  c.set("num_kv_heads", int64_t{2});
  if (preset == "s1560") c.set("vocab_size", int64_t{1024});
  ParamSet<float> p(ParamLayout(param_specs(ModelConfig::from_config(c))));
  init_params(p, seed);
  return p;
}

struct Stats {
  double mean = 0, sd = 0, max_abs = 0;
};
Stats stats(std::span<const float> v) {
  Stats s;
  for (float x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  for (float x : v) {
    s.sd += (x - s.mean) * (x - s.mean);
    s.max_abs = std::max(s.max_abs, std::fabs(static_cast<double>(x)));
  }
  s.sd = std::sqrt(s.sd / static_cast<double>(v.size()));
  return s;
}

// max |W Wᵀ − gain²·I| (rows <= cols) or |WᵀW − gain²·I| (rows > cols), in fp64.
double orthogonality_error(const float* w, int64_t rows, int64_t cols, double gain) {
  const bool by_rows = rows <= cols;
  const int64_t n = by_rows ? rows : cols, len = by_rows ? cols : rows;
  auto at = [&](int64_t vec, int64_t k) { return static_cast<double>(by_rows ? w[vec * cols + k] : w[k * cols + vec]); };
  double worst = 0;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a; b < n; ++b) {
      double dot = 0;
      for (int64_t k = 0; k < len; ++k) dot += at(a, k) * at(b, k);
      worst = std::max(worst, std::fabs(dot - (a == b ? gain * gain : 0.0)));
    }
  return worst;
}

void expect_all(std::span<const float> v, float value, const std::string& what) {
  for (float x : v) ASSERT_EQ(x, value) << what;
}

}  // namespace

TEST(Init, EveryRuleOfEveryStack) {
  for (const char* preset : {"baseline", "s691", "s562", "s600", "s1560"}) {
    const ParamSet<float> p = init_preset(preset);
    for (size_t i = 0; i < p.layout().size(); ++i) {
      const ParamSpec& s = p.layout().spec(i);
      const auto v = p[i];
      const std::string what = std::string(preset) + " " + s.name;
      switch (s.init) {
        case InitKind::Zeros: expect_all(v, 0.0f, what); break;
        case InitKind::Ones: expect_all(v, 1.0f, what); break;
        case InitKind::Constant: expect_all(v, static_cast<float>(s.init_value), what); break;
        case InitKind::ResidMix:
          expect_all(v.subspan(0, v.size() / 2), 1.0f, what);
          expect_all(v.subspan(v.size() / 2), 0.0f, what);
          break;
        case InitKind::Normal: {
          // Sample mean and sd of n draws: within 6 standard errors (sd/√n and sd/√(2n)).
          const Stats st = stats(v);
          const double n = static_cast<double>(v.size());
          EXPECT_NEAR(st.mean, 0.0, 6 * s.init_value / std::sqrt(n)) << what;
          EXPECT_NEAR(st.sd, s.init_value, 6 * s.init_value / std::sqrt(2 * n)) << what;
          break;
        }
        case InitKind::LinearDefault: {
          const double bound = 1.0 / std::sqrt(static_cast<double>(s.shape.back()));
          const Stats st = stats(v);
          EXPECT_LE(st.max_abs, bound) << what;
          EXPECT_GT(st.max_abs, 0.9 * bound) << what;
          // U(−b, b) has sd b/√3; the sample sd's standard error is about 0.9·sd/√n.
          EXPECT_NEAR(st.sd, bound / std::sqrt(3.0), 6 * bound / std::sqrt(static_cast<double>(v.size()))) << what;
          break;
        }
        case InitKind::Orthogonal: {
          const int64_t rows = s.shape[s.shape.size() - 2], cols = s.shape.back();
          const int64_t slices = s.shape.size() == 3 ? s.shape[0] : 1;
          for (int64_t b = 0; b < slices; ++b) {
            const float* w = v.data() + b * rows * cols;
            if (s.zero_slices_from >= 0 && b >= s.zero_slices_from) {
              expect_all(std::span<const float>(w, static_cast<size_t>(rows * cols)), 0.0f, what + " zero slice");
              continue;
            }
            EXPECT_LE(orthogonality_error(w, rows, cols, s.init_value), 1e-5) << what << " slice " << b;
          }
          break;
        }
      }
    }
  }
}

TEST(Init, ReferenceConstantsByName) {
  const ParamSet<float> s691 = init_preset("s691");
  expect_all(s691["blocks.0.attn.q_gain"], 1.5f, "q_gain");
  expect_all(s691["bigram.scale"], 0.05f, "bigram.scale");
  expect_all(s691["ve_shared.scale"], 0.1f, "ve_shared.scale");
  expect_all(s691["ve_layer_scales.1"], 1.0f, "ve_layer_scales");
  expect_all(s691["bigram.embed.weight"], 0.0f, "bigram.embed");
  expect_all(s691["smear.gate"], 0.0f, "smear.gate");
  expect_all(s691["blocks.10.attn.proj.weight"], 0.0f, "attn.proj");
  expect_all(s691["blocks.3.mlp.proj.weight"], 0.0f, "mlp.proj");
  expect_all(s691["skip_weights"], 1.0f, "skip_weights");
  // bigram.proj [d, bigram_dim]: orthogonal x 1/sqrt(2L) = 1/sqrt(22) in the non-banked ortho stacks.
  const auto& bp = s691.layout().spec(s691.layout().index_of("bigram.proj.weight"));
  EXPECT_NEAR(bp.init_value, 1.0 / std::sqrt(22.0), 1e-15);
  EXPECT_LE(orthogonality_error(s691["bigram.proj.weight"].data(), bp.shape[0], bp.shape[1], bp.init_value), 1e-5);
  EXPECT_NEAR(stats(s691["tok_emb.weight"]).sd, 0.005, 2e-4);

  const ParamSet<float> s562 = init_preset("s562");
  expect_all(s562["blocks.4.attn.vr_lambda"], 0.5f, "vr_lambda");
  expect_all(s562["blocks.4.attn.attn_gate.bias"], 4.0f, "attn_gate.bias");
  expect_all(s562["blocks.4.attn.attn_gate.weight"], 0.0f, "attn_gate.weight");

  const ParamSet<float> s600 = init_preset("s600");
  expect_all(s600["blocks.2.attn_gate"], 0.0f, "attn_gate");
  expect_all(s600["blocks.2.mlp_gate"], 0.0f, "mlp_gate");
  EXPECT_NEAR(stats(s600["bigram_emb.weight"]).sd, 1.0, 0.01);  // nn.Embedding default N(0, 1)

  const ParamSet<float> s1560 = init_preset("s1560");
  expect_all(s1560["blocks.0.attn.q_gain"], 5.0f, "q_gain s1560");
  expect_all(s1560["parallel_resid_lambdas"], 1.1f, "parallel_resid_lambdas");
  expect_all(s1560["parallel_post_lambdas"], 1.0f, "parallel_post_lambdas");
  expect_all(s1560["skip_gates"], 0.0f, "skip_gates");
  expect_all(s1560["mlp_down_bank"], 0.0f, "mlp_down_bank");
  EXPECT_EQ(s1560["skip_weights"].size(), 8u * 64u);  // 8 skips of the looped plan

  const ParamSet<float> base = init_preset("baseline");
  // c_q [64, 64]: nn.Linear default U(±1/8).
  EXPECT_LE(stats(base["blocks.0.attn.c_q.weight"]).max_abs, 0.125);
}

TEST(Init, DeterministicPerSeed) {
  const ParamSet<float> a = init_preset("s1560", 7), b = init_preset("s1560", 7), c = init_preset("s1560", 8);
  ASSERT_EQ(a.all().size(), b.all().size());
  EXPECT_TRUE(std::equal(a.all().begin(), a.all().end(), b.all().begin()));
  EXPECT_FALSE(std::equal(a.all().begin(), a.all().end(), c.all().begin()));
}

TEST(Init, OrthogonalTallAndWide) {
  Rng rng(3);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{48, 16}, {16, 48}, {32, 32}}) {
    std::vector<double> w(static_cast<size_t>(rows * cols));
    orthogonal_init(w.data(), rows, cols, 2.0, rng);
    std::vector<float> f(w.begin(), w.end());
    EXPECT_LE(orthogonality_error(f.data(), rows, cols, 2.0), 1e-5) << rows << "x" << cols;
  }
}
