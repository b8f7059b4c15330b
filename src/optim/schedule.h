// Training schedules (SPEC §4.4, §4.6–4.8): pure functions of (step, elapsed training ms, config).
// `step` is the index of the step about to run (0-based, as the references' loop variable before
// its increment) unless a function says otherwise; `elapsed_ms` is the training time so far,
// excluding validation pauses.
#pragma once

#include <cstdint>

#include "core/config.h"

namespace pgolf::optim {

struct Schedule {
  // Effective wall-clock cap in ms: max_wallclock_seconds − gptq_reserve_seconds (0 = no cap).
  double cap_ms = 600000.0;
  int64_t iterations = 20000;
  int64_t warmdown_iters = 1200;  // wall-clock (or iteration) warmdown length, in steps
  double warmdown_frac = 0.0;     // > 0: fraction-based warmdown (S1560) instead of warmdown_iters
  double min_lr = 0.0;            // floor of the fraction-based warmdown
  double momentum_start = 0.85;
  double momentum_end = 0.95;
  int64_t momentum_warmup_steps = 500;
  int num_loops = 0;              // depth recurrence present (> 0) ...
  double enable_looping_at = 0.35;  // ... switched on at this training fraction
  double late_qat_threshold = 0.0;  // > 0: fake quantization once the lr scale drops below it
  bool swa_enabled = false;
  double swa_start_frac = 0.4;
  int64_t swa_every = 50;

  static Schedule from_config(const Config& c);

  bool has_cap() const { return cap_ms > 0.0; }

  // Training fraction: elapsed / cap, or step / iterations without a cap.
  double training_fraction(int64_t step, double elapsed_ms) const;

  // Learning-rate multiplier applied to every group's base lr.
  // warmdown_frac > 0: 1 before 1 − warmdown_frac of training, then max((1 − frac)/warmdown_frac, min_lr).
  // Otherwise with a cap: with avg = elapsed/max(step,1), wd = warmdown_iters·avg and
  // rem = max(cap − elapsed, 0): rem/wd when rem ≤ wd, else 1 (linear to 0 at the cap).
  // Without a cap: linear over the last warmdown_iters of `iterations`.
  double lr_scale(int64_t step, double elapsed_ms) const;

  // Muon momentum: (1 − f)·start + f·end with f = min(step / warmup_steps, 1).
  double muon_momentum(int64_t step) const;

  // Depth recurrence switches on (the caller latches it) once the training fraction reaches enable_looping_at.
  bool looping_due(int64_t step, double elapsed_ms) const;

  // Late QAT switches on (the caller latches it) at the first step whose lr scale is below the threshold.
  bool late_qat_due(double lr_scale) const;

  // SWA snapshot after a step: `completed_steps` is the step count after the increment, `lr_scale`
  // the scale that step ran with.
  bool swa_snapshot_due(int64_t completed_steps, double lr_scale) const;

  // Stop rule, checked after each step (the caller all-reduces it with MAX across ranks): the step
  // that reaches the cap is the last one.
  bool reached_cap(double elapsed_ms) const;
};

}  // namespace pgolf::optim
