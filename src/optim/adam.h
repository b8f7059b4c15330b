// Adam / AdamW (SPEC §4.3) over a group of parameters: bias-corrected, decoupled weight decay,
// the arithmetic of PyTorch's fused AdamW (update_math.h). Adam is AdamW with weight decay 0.
#pragma once

#include <cstdint>
#include <vector>

#include "model/params.h"

namespace pgolf::optim {

struct AdamOptions {
  double lr = 0.04;  // base learning rate (times the schedule's lr scale)
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class Adam {
 public:
  Adam(const ParamLayout& layout, std::vector<size_t> members, AdamOptions options);

  // The t-th step (t >= 1 counts the steps taken, for the bias corrections).
  void step(ParamSet<float>& params, const ParamSet<float>& grads, double lr_scale, int64_t t);

  const std::vector<size_t>& members() const { return members_; }
  const AdamOptions& options() const { return options_; }
  std::vector<float>& exp_avg(size_t k) { return exp_avg_[k]; }
  std::vector<float>& exp_avg_sq(size_t k) { return exp_avg_sq_[k]; }
  const std::vector<float>& exp_avg(size_t k) const { return exp_avg_[k]; }
  const std::vector<float>& exp_avg_sq(size_t k) const { return exp_avg_sq_[k]; }

 private:
  std::vector<size_t> members_;
  std::vector<std::vector<float>> exp_avg_, exp_avg_sq_;
  AdamOptions options_;
};

}  // namespace pgolf::optim
