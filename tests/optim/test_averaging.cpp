// EMA and uniform SWA arithmetic (SPEC §4.6) and their checkpoint state.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/rng.h"
#include "core/safetensors.h"
#include "optim/averaging.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

ParamLayout small_layout() {
  return ParamLayout({{"a.weight", {3, 4}, ParamGroup::Matrix, InitKind::Zeros},
                      {"b", {5}, ParamGroup::Scalar, InitKind::Zeros},
                      {"c", {}, ParamGroup::Scalar, InitKind::Zeros}});
}

// Every tensor random; the layout's padding between tensors stays zero, as in real parameters.
ParamSet<float> random_params(const ParamLayout& layout, uint64_t seed) {
  ParamSet<float> p(layout);
  Rng rng(seed);
  for (size_t i = 0; i < layout.size(); ++i)
    for (float& x : p[i]) x = static_cast<float>(rng.normal());
  return p;
}

// Bit-level equality of two float arrays.
bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(Ema, StartsAtTheInitialWeightsAndFollowsTheRecurrence) {
  const ParamLayout layout = small_layout();
  const ParamSet<float> initial = random_params(layout, 1);
  Ema ema(initial, 0.997);
  EXPECT_TRUE(same_bits(ema.average().all(), initial.all()));

  // Against the closed form in fp64: ema_n = d^n·θ0 + (1 − d)·Σ_k d^(n−k)·θ_k. The fp32 recurrence
  // rounds twice per step, each time by at most 2^-24·|value| with |value| < 5 here, so 20 steps
  // stay below 40·2^-24·5 ≈ 1.2e-5.
  std::vector<ParamSet<float>> thetas;
  for (float x : initial.all()) ASSERT_LT(std::fabs(x), 5.0f);
  for (int k = 1; k <= 20; ++k) {
    thetas.push_back(random_params(layout, 100 + k));
    for (float x : thetas.back().all()) ASSERT_LT(std::fabs(x), 5.0f);
    ema.update(thetas.back());
  }
  const double d = 0.997;
  for (size_t i = 0; i < static_cast<size_t>(layout.total()); ++i) {
    double want = std::pow(d, 20) * initial.all()[i];
    for (int k = 1; k <= 20; ++k) want += (1.0 - d) * std::pow(d, 20 - k) * thetas[k - 1].all()[i];
    EXPECT_NEAR(ema.average().all()[i], want, 1.2e-5) << i;
  }
  ParamSet<float> model(layout);
  ema.copy_to(model);
  EXPECT_TRUE(same_bits(model.all(), ema.average().all()));
}

TEST(Ema, OneStepIsTheReferenceFormula) {
  const ParamLayout layout = small_layout();
  ParamSet<float> zero(layout), ones(layout);
  for (float& x : ones.all()) x = 1.0f;
  Ema ema(zero, 0.9965);
  ema.update(ones);  // 0.9965·0 + (1 − 0.9965)·1
  for (float x : ema.average().all()) EXPECT_FLOAT_EQ(x, static_cast<float>(1.0 - 0.9965));
  EXPECT_THROW(Ema(zero, 1.0), Error);
}

TEST(Ema, StateRoundTripsBitExactly) {
  const ParamLayout layout = small_layout();
  Ema a(random_params(layout, 1), 0.997);
  for (int k = 0; k < 3; ++k) a.update(random_params(layout, 10 + k));
  const TensorMap saved = parse_safetensors(serialize_safetensors(a.state_tensors()), "ema state");
  EXPECT_TRUE(saved.has("ema/a.weight"));
  Ema b(random_params(layout, 99), 0.997);
  b.load_state_tensors(saved, "ema state");
  EXPECT_TRUE(same_bits(a.average().all(), b.average().all()));
  const ParamSet<float> next = random_params(layout, 50);
  a.update(next);
  b.update(next);
  EXPECT_TRUE(same_bits(a.average().all(), b.average().all()));
}

TEST(Swa, AveragesTheSnapshotsOnceThereAreTwo) {
  const ParamLayout layout = small_layout();
  Swa swa(layout);
  ParamSet<float> model(layout);
  EXPECT_FALSE(swa.ready());
  EXPECT_THROW(swa.average_into(model), Error);

  ParamSet<float> s1(layout), s2(layout), s3(layout);
  for (size_t i = 0; i < s1.all().size(); ++i) {
    s1.all()[i] = static_cast<float>(i);
    s2.all()[i] = 2.0f * static_cast<float>(i);
    s3.all()[i] = -0.5f;
  }
  swa.add(s1);
  EXPECT_FALSE(swa.ready());  // one snapshot is never applied
  swa.add(s2);
  swa.add(s3);
  EXPECT_EQ(swa.count(), 3);
  swa.average_into(model);
  for (size_t i = 0; i < model.all().size(); ++i)  // (i + 2i − 0.5) / 3, exact sums in fp32
    EXPECT_FLOAT_EQ(model.all()[i], (3.0f * static_cast<float>(i) - 0.5f) / 3.0f);
}

TEST(Swa, StateRoundTripsBitExactly) {
  const ParamLayout layout = small_layout();
  Swa a(layout);
  a.add(random_params(layout, 1));
  a.add(random_params(layout, 2));
  const TensorMap saved = parse_safetensors(serialize_safetensors(a.state_tensors()), "swa state");
  Swa b(layout);
  b.load_state_tensors(saved, "swa state");
  EXPECT_EQ(b.count(), 2);
  const ParamSet<float> third = random_params(layout, 3);
  a.add(third);
  b.add(third);
  ParamSet<float> ma(layout), mb(layout);
  a.average_into(ma);
  b.average_into(mb);
  EXPECT_TRUE(same_bits(ma.all(), mb.all()));
}

TEST(Averaging, StateOfAnotherModelIsRejected) {
  const ParamLayout layout = small_layout();
  const ParamLayout other({{"a.weight", {4, 3}, ParamGroup::Matrix, InitKind::Zeros},
                           {"b", {5}, ParamGroup::Scalar, InitKind::Zeros},
                           {"c", {}, ParamGroup::Scalar, InitKind::Zeros}});
  Ema a(random_params(layout, 1), 0.997);
  Ema b(random_params(other, 1), 0.997);
  EXPECT_THROW(b.load_state_tensors(a.state_tensors(), "ema state"), Error);  // shape [3,4] vs [4,3]
  Swa s(layout);
  EXPECT_THROW(s.load_state_tensors(a.state_tensors(), "ema state"), Error);  // no swa/ tensors
}

}  // namespace
