#include "optim/averaging.h"

#include "core/error.h"
#include "optim/state_io.h"
#include "optim/update_math.h"

namespace pgolf::optim {

namespace {

void check_same_layout(const ParamLayout& a, const ParamLayout& b, const char* what) {
  PG_CHECK(a.size() == b.size() && a.total() == b.total(),
           "{}: the parameters ({} tensors, {} values) do not match the averaged model ({} tensors, {} values)", what,
           b.size(), b.total(), a.size(), a.total());
}

}  // namespace

Ema::Ema(const ParamSet<float>& initial, double decay) : average_(initial), decay_(decay) {
  PG_CHECK(decay >= 0.0 && decay < 1.0, "ema_decay must be in [0, 1), got {}", decay);
}

void Ema::update(const ParamSet<float>& params) {
  check_same_layout(average_.layout(), params.layout(), "EMA update");
  const float d = static_cast<float>(decay_), one_minus_d = static_cast<float>(1.0 - decay_);
  std::span<float> avg = average_.all();
  std::span<const float> theta = params.all();
  const int64_t n = static_cast<int64_t>(avg.size());
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) avg[i] = ema_update(avg[i], theta[i], d, one_minus_d);
}

void Ema::copy_to(ParamSet<float>& params) const {
  check_same_layout(average_.layout(), params.layout(), "EMA apply");
  std::copy(average_.all().begin(), average_.all().end(), params.all().begin());
}

TensorMap Ema::state_tensors() const {
  TensorMap out;
  const ParamLayout& l = average_.layout();
  for (size_t i = 0; i < l.size(); ++i) put_f32(out, "ema/" + l.spec(i).name, l.spec(i).shape, average_[i]);
  return out;
}

void Ema::load_state_tensors(const TensorMap& t, const std::string& what) {
  const ParamLayout& l = average_.layout();
  for (size_t i = 0; i < l.size(); ++i) get_f32(t, "ema/" + l.spec(i).name, l.spec(i).shape, average_[i], what);
}

Swa::Swa(const ParamLayout& layout) : sum_(layout) {}

void Swa::add(const ParamSet<float>& params) {
  check_same_layout(sum_.layout(), params.layout(), "SWA snapshot");
  if (count_ == 0) {
    std::copy(params.all().begin(), params.all().end(), sum_.all().begin());
  } else {
    std::span<float> s = sum_.all();
    std::span<const float> p = params.all();
    for (size_t i = 0; i < s.size(); ++i) s[i] += p[i];
  }
  ++count_;
}

void Swa::average_into(ParamSet<float>& params) const {
  PG_CHECK(ready(), "SWA needs at least 2 snapshots to be applied, has {}", count_);
  check_same_layout(sum_.layout(), params.layout(), "SWA apply");
  const float count = static_cast<float>(count_);
  std::span<const float> s = sum_.all();
  std::span<float> p = params.all();
  for (size_t i = 0; i < s.size(); ++i) p[i] = s[i] / count;
}

TensorMap Swa::state_tensors() const {
  TensorMap out;
  const ParamLayout& l = sum_.layout();
  for (size_t i = 0; i < l.size(); ++i) put_f32(out, "swa/" + l.spec(i).name, l.spec(i).shape, sum_[i]);
  put_i64(out, "swa/count", count_);
  return out;
}

void Swa::load_state_tensors(const TensorMap& t, const std::string& what) {
  const ParamLayout& l = sum_.layout();
  count_ = get_i64(t, "swa/count", what);
  PG_CHECK(count_ >= 0, "{}: swa/count is {}", what, count_);
  for (size_t i = 0; i < l.size(); ++i) get_f32(t, "swa/" + l.spec(i).name, l.spec(i).shape, sum_[i], what);
}

}  // namespace pgolf::optim
