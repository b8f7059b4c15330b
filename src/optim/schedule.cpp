#include "optim/schedule.h"

#include <algorithm>

#include "core/error.h"

namespace pgolf::optim {

Schedule Schedule::from_config(const Config& c) {
  Schedule s;
  const double cap_s = c.get_double("max_wallclock_seconds");
  const double reserve_s = c.get_double("gptq_reserve_seconds");
  PG_CHECK(cap_s >= 0.0 && reserve_s >= 0.0, "max_wallclock_seconds {} and gptq_reserve_seconds {} must be >= 0",
           cap_s, reserve_s);
  PG_CHECK(cap_s == 0.0 || reserve_s < cap_s, "gptq_reserve_seconds {} leaves no training time under the {} s cap",
           reserve_s, cap_s);
  s.cap_ms = cap_s > 0.0 ? 1000.0 * cap_s - 1000.0 * reserve_s : 0.0;
  s.iterations = c.get_int("iterations");
  s.warmdown_iters = c.get_int("warmdown_iters");
  s.warmdown_frac = c.get_double("warmdown_frac");
  PG_CHECK(s.warmdown_frac >= 0.0 && s.warmdown_frac <= 1.0, "warmdown_frac {} outside [0, 1]", s.warmdown_frac);
  s.min_lr = c.get_double("min_lr");
  s.momentum_start = c.get_double("muon_momentum_warmup_start");
  s.momentum_end = c.get_double("muon_momentum");
  s.momentum_warmup_steps = c.get_int("muon_momentum_warmup_steps");
  s.num_loops = static_cast<int>(c.get_int("num_loops"));
  s.enable_looping_at = c.get_double("enable_looping_at");
  s.late_qat_threshold = c.get_double("late_qat_threshold");
  s.swa_enabled = c.get_bool("swa_enabled");
  s.swa_start_frac = c.get_double("swa_start_frac");
  s.swa_every = c.get_int("swa_every");
  PG_CHECK(!s.swa_enabled || s.swa_every > 0, "swa_every must be positive when swa_enabled, got {}", s.swa_every);
  PG_CHECK(!(s.swa_enabled && c.get_bool("ema_enabled")),
           "swa_enabled and ema_enabled are both set; a run applies one average (S562 skips SWA under EMA, "
           "the #414 family's SWA is never applied)");
  return s;
}

double Schedule::training_fraction(int64_t step, double elapsed_ms) const {
  if (!has_cap()) return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(iterations, 1));
  return elapsed_ms / std::max(cap_ms, 1e-9);
}

double Schedule::lr_scale(int64_t step, double elapsed_ms) const {
  if (warmdown_frac > 0.0) {
    const double frac = training_fraction(step, elapsed_ms);
    if (frac >= 1.0 - warmdown_frac) return std::max((1.0 - frac) / warmdown_frac, min_lr);
    return 1.0;
  }
  if (warmdown_iters <= 0) return 1.0;
  if (!has_cap()) {
    const int64_t start = std::max<int64_t>(iterations - warmdown_iters, 0);
    if (start <= step && step < iterations)
      return std::max(static_cast<double>(iterations - step) / static_cast<double>(warmdown_iters), 0.0);
    return 1.0;
  }
  const double step_ms = elapsed_ms / static_cast<double>(std::max<int64_t>(step, 1));
  const double warmdown_ms = static_cast<double>(warmdown_iters) * step_ms;
  const double remaining_ms = std::max(cap_ms - elapsed_ms, 0.0);
  return remaining_ms <= warmdown_ms ? remaining_ms / std::max(warmdown_ms, 1e-9) : 1.0;
}

double Schedule::muon_momentum(int64_t step) const {
  const double f = momentum_warmup_steps > 0
                       ? std::min(static_cast<double>(step) / static_cast<double>(momentum_warmup_steps), 1.0)
                       : 1.0;
  return (1.0 - f) * momentum_start + f * momentum_end;
}

bool Schedule::looping_due(int64_t step, double elapsed_ms) const {
  return num_loops > 0 && training_fraction(step, elapsed_ms) >= enable_looping_at;
}

bool Schedule::late_qat_due(double scale) const { return late_qat_threshold > 0.0 && scale < late_qat_threshold; }

bool Schedule::swa_snapshot_due(int64_t completed_steps, double scale) const {
  return swa_enabled && scale < swa_start_frac && completed_steps % swa_every == 0;
}

bool Schedule::reached_cap(double elapsed_ms) const { return has_cap() && elapsed_ms >= cap_ms; }

}  // namespace pgolf::optim
