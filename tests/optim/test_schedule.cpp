// Schedules (SPEC §4.4, §4.6-4.8) as pure functions of (step, elapsed ms, config).
#include <gtest/gtest.h>

#include "core/error.h"
#include "optim/schedule.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

Schedule preset_schedule(const std::string& preset) { return Schedule::from_config(Config::load(preset)); }

// SPEC §4.4's #414 example: a constant 84.5 ms per step, WARMDOWN_ITERS 3500, 600 s cap.
constexpr double kStepMs = 84.5;
double elapsed_at(int64_t step) { return kStepMs * static_cast<double>(step); }

// First step index k (from `from`) at which pred(k) holds.
template <typename Pred>
int64_t first_step(int64_t from, Pred pred) {
  for (int64_t k = from; k < 100000; ++k)
    if (pred(k)) return k;
  return -1;
}

TEST(Schedule, WallClockWarmdownMatchesTheSpecExample) {
  const Schedule s = preset_schedule("s691");
  EXPECT_DOUBLE_EQ(s.cap_ms, 600000.0);
  // Decay starts when the remaining time is within 3500 average steps: 600000 - e <= 3500 * 84.5,
  // i.e. e >= 304250 ms, step 3601 ("decay starts ≈ 304 s (step ≈ 3,600)").
  EXPECT_EQ(first_step(1, [&](int64_t k) { return s.lr_scale(k, elapsed_at(k)) < 1.0; }), 3601);
  EXPECT_DOUBLE_EQ(s.lr_scale(3600, elapsed_at(3600)), 1.0);
  // A value inside the warmdown: rem = 600000 - 422500, wd = 3500 * 84.5.
  EXPECT_NEAR(s.lr_scale(5000, elapsed_at(5000)), (600000.0 - 422500.0) / (3500.0 * 84.5), 1e-12);
  // scale < 0.15 from step 6576 ("< 0.15 at ≈ 6,575"): late QAT at 0.15 triggers there.
  const int64_t qat = first_step(1, [&](int64_t k) { return s.late_qat_due(s.lr_scale(k, elapsed_at(k))); });
  EXPECT_EQ(qat, 6576);
  EXPECT_GE(s.lr_scale(qat - 1, elapsed_at(qat - 1)), 0.15);
  // The cap: the step that brings the elapsed time to >= 600 s is the last ("stop at 7,096–7,103").
  const int64_t last = first_step(1, [&](int64_t done) { return s.reached_cap(elapsed_at(done)); });
  EXPECT_EQ(last, 7101);
  EXPECT_DOUBLE_EQ(s.lr_scale(7101, 600000.0), 0.0);  // remaining time 0
}

// The tight SWA of #414 (scale < 0.2, every 50 steps) is dead code there, but the same condition
// with swa_start_frac = 0.2 gives the log's first snapshot "scale < 0.2 at step ≈ 6,450": the first
// multiple of 50 (counted after the increment) whose step ran below 0.2.
TEST(Schedule, SwaConditionUsesTheStepCountAfterTheIncrement) {
  Config c = Config::load("s691");
  c.set("swa_enabled", true);
  c.set("swa_start_frac", 0.2);
  EXPECT_THROW(Schedule::from_config(c), Error);  // with EMA on, SWA would never be applied
  c.set("ema_enabled", false);
  const Schedule s = Schedule::from_config(c);
  const int64_t first = first_step(1, [&](int64_t done) {
    const int64_t k = done - 1;  // the step that just ran
    return s.swa_snapshot_due(done, s.lr_scale(k, elapsed_at(k)));
  });
  EXPECT_EQ(first, 6450);
  // scale < 0.2 already from step 6401, but 6401..6449 are not multiples of 50.
  EXPECT_LT(s.lr_scale(6401, elapsed_at(6401)), 0.2);
  EXPECT_GE(s.lr_scale(6400, elapsed_at(6400)), 0.2);
  EXPECT_FALSE(s.swa_snapshot_due(6500, 0.5));   // scale too high
  EXPECT_TRUE(s.swa_snapshot_due(6500, 0.19));
  EXPECT_FALSE(s.swa_snapshot_due(6501, 0.19));  // not a multiple of 50
  c.set("swa_enabled", false);
  EXPECT_FALSE(Schedule::from_config(c).swa_snapshot_due(6500, 0.19));
}

TEST(Schedule, IterationWarmdownWithoutACap) {
  Config c = Config::load("s691");
  c.set("max_wallclock_seconds", 0.0);
  const Schedule s = Schedule::from_config(c);  // iterations 20000, warmdown 3500
  EXPECT_FALSE(s.has_cap());
  EXPECT_FALSE(s.reached_cap(1e12));
  EXPECT_DOUBLE_EQ(s.lr_scale(16499, 1e9), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_scale(16500, 0.0), 1.0);  // (20000 - 16500) / 3500
  EXPECT_DOUBLE_EQ(s.lr_scale(16501, 0.0), 3499.0 / 3500.0);
  EXPECT_DOUBLE_EQ(s.lr_scale(19999, 0.0), 1.0 / 3500.0);
  EXPECT_DOUBLE_EQ(s.training_fraction(5000, 123.0), 0.25);
  c.set("warmdown_iters", int64_t{0});
  EXPECT_DOUBLE_EQ(Schedule::from_config(c).lr_scale(19999, 0.0), 1.0);
}

TEST(Schedule, FractionWarmdownOfS1560) {
  const Schedule s = preset_schedule("s1560");
  EXPECT_DOUBLE_EQ(s.cap_ms, 587000.0);  // 600 s minus the 13 s GPTQ reserve
  const double cap = 587000.0;
  EXPECT_DOUBLE_EQ(s.lr_scale(10, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_scale(10, 0.2 * cap), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_scale(10, 0.25 * cap), 1.0);         // frac = 1 - 0.75: (1 - 0.25)/0.75
  EXPECT_NEAR(s.lr_scale(10, 0.5 * cap), 0.5 / 0.75, 1e-12);  // linear, not cosine
  EXPECT_NEAR(s.lr_scale(10, 0.9 * cap), 0.1 / 0.75, 1e-12);
  EXPECT_DOUBLE_EQ(s.lr_scale(10, cap), 0.0);
  EXPECT_DOUBLE_EQ(s.lr_scale(10, 1.1 * cap), 0.0);  // max(negative, min_lr = 0)
  EXPECT_FALSE(s.reached_cap(586999.0));
  EXPECT_TRUE(s.reached_cap(587000.0));

  Config c = Config::load("s1560");
  c.set("min_lr", 0.1);
  EXPECT_DOUBLE_EQ(Schedule::from_config(c).lr_scale(10, 0.95 * cap), 0.1);
  c.set("max_wallclock_seconds", 0.0);  // no cap: the fraction is step / iterations
  EXPECT_NEAR(Schedule::from_config(c).lr_scale(15000, 0.0), 0.25 / 0.75, 1e-12);
}

TEST(Schedule, LoopingSwitchesOnAtTheTrainingFraction) {
  const Schedule s = preset_schedule("s1560");
  const double cap = 587000.0;
  EXPECT_FALSE(s.looping_due(100, 0.3499 * cap));
  EXPECT_TRUE(s.looping_due(100, 0.35 * cap));
  EXPECT_TRUE(s.looping_due(100, 0.9 * cap));
  EXPECT_FALSE(preset_schedule("s691").looping_due(100, 0.9 * 600000.0));  // no recurrence
}

TEST(Schedule, MuonMomentumWarmup) {
  const Schedule s = preset_schedule("s691");  // 0.92 -> 0.99 over 1500 steps
  EXPECT_DOUBLE_EQ(s.muon_momentum(0), 0.92);
  EXPECT_NEAR(s.muon_momentum(750), 0.955, 1e-15);
  EXPECT_NEAR(s.muon_momentum(1500), 0.99, 1e-15);
  EXPECT_NEAR(s.muon_momentum(9000), 0.99, 1e-15);
  EXPECT_NEAR(preset_schedule("baseline").muon_momentum(250), 0.9, 1e-15);  // 0.85 -> 0.95 over 500
  EXPECT_NEAR(preset_schedule("s1560").muon_momentum(3000), 0.97, 1e-15);
  Config c = Config::load("s691");
  c.set("muon_momentum_warmup_steps", int64_t{0});
  EXPECT_DOUBLE_EQ(Schedule::from_config(c).muon_momentum(0), 0.99);
}

TEST(Schedule, LateQatNeedsAPositiveThreshold) {
  const Schedule s562 = preset_schedule("s562");  // 0.5
  EXPECT_FALSE(s562.late_qat_due(0.5));
  EXPECT_TRUE(s562.late_qat_due(0.4999));
  EXPECT_FALSE(preset_schedule("baseline").late_qat_due(0.0));  // threshold 0 = off
}

TEST(Schedule, RejectsAReserveLargerThanTheCap) {
  Config c = Config::load("s1560");
  c.set("gptq_reserve_seconds", 600.0);
  EXPECT_THROW(Schedule::from_config(c), Error);
}

}  // namespace
