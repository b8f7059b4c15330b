#include "optim/adam.h"

#include "core/error.h"
#include "optim/update_math.h"

namespace pgolf::optim {

Adam::Adam(const ParamLayout& layout, std::vector<size_t> members, AdamOptions options)
    : members_(std::move(members)), options_(options) {
  for (size_t idx : members_) {
    exp_avg_.emplace_back(static_cast<size_t>(layout.numel(idx)), 0.0f);
    exp_avg_sq_.emplace_back(static_cast<size_t>(layout.numel(idx)), 0.0f);
  }
}

void Adam::step(ParamSet<float>& params, const ParamSet<float>& grads, double lr_scale, int64_t t) {
  PG_CHECK(t >= 1, "Adam step count must start at 1, got {}", t);
  const AdamCoeffs c = adam_coeffs(options_.lr * lr_scale, options_.beta1, options_.beta2, options_.weight_decay,
                                   options_.eps, t);
  for (size_t k = 0; k < members_.size(); ++k) {
    std::span<float> p = params[members_[k]];
    std::span<const float> g = grads[members_[k]];
    float* m = exp_avg_[k].data();
    float* v = exp_avg_sq_[k].data();
    const int64_t n = static_cast<int64_t>(p.size());
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; ++i) adamw_update(p[i], g[i], m[i], v[i], c);
  }
}

}  // namespace pgolf::optim
