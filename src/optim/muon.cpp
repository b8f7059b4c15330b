#include "optim/muon.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/half.h"
#include "optim/update_math.h"

namespace pgolf::optim {

namespace {

struct RoundBf16 {
  float operator()(float x) const { return round_to_bf16(x); }
};

constexpr int64_t kParallelElems = 1 << 15;

// u_row ← u_row / max(‖u_row‖₂, 1e-7) for every row of the [rows_total, cols] update; the norm is
// reduced in fp32-or-better and stored in the update's precision before the division.
template <typename Round>
void normalize_rows(std::span<float> u, int64_t rows_total, int64_t cols, Round round) {
#pragma omp parallel for schedule(static) if (rows_total * cols >= kParallelElems)
  for (int64_t r = 0; r < rows_total; ++r) {
    float* row = u.data() + r * cols;
    double sum_sq = 0.0;
    for (int64_t j = 0; j < cols; ++j) sum_sq += static_cast<double>(row[j]) * row[j];
    const float norm = round(std::max(static_cast<float>(std::sqrt(sum_sq)), 1e-7f));
    for (int64_t j = 0; j < cols; ++j) row[j] = round(row[j] / norm);
  }
}

template <typename Round>
void nesterov_all(std::span<float> u, std::span<const float> g, std::vector<float>& buf, float mu, Round round) {
  const int64_t n = static_cast<int64_t>(u.size());
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
  for (int64_t i = 0; i < n; ++i) u[i] = muon_nesterov(round(g[i]), buf[i], mu, round);
}

}  // namespace

Muon::Muon(const ParamLayout& layout, std::vector<size_t> members, MuonOptions options)
    : members_(std::move(members)), options_(options) {
  PG_CHECK(options_.ns_steps >= 0, "muon_backend_steps must be >= 0, got {}", options_.ns_steps);
  size_t largest = 0;
  for (size_t idx : members_) {
    const ParamSpec& s = layout.spec(idx);
    PG_CHECK(s.shape.size() == 2 || s.shape.size() == 3,
             "Muon updates matrices and 3-D banks; '{}' has shape {}", s.name, shape_str(s.shape));
    const bool bank = s.shape.size() == 3;
    Member m{idx, bank ? s.shape[0] : 1, s.shape[bank ? 1 : 0], s.shape[bank ? 2 : 1], bank};
    shapes_.push_back(m);
    momentum_.emplace_back(static_cast<size_t>(s.numel()), 0.0f);
    largest = std::max(largest, static_cast<size_t>(s.numel()));
  }
  update_.resize(largest);
}

void Muon::step(ParamSet<float>& params, const ParamSet<float>& grads, double lr_scale, double momentum) {
  const double lr = options_.lr * lr_scale;
  const float mu = static_cast<float>(momentum);
  for (size_t k = 0; k < members_.size(); ++k)
    step_member(k, params[members_[k]], grads[members_[k]], lr, mu);
}

void Muon::step_member(size_t k, std::span<float> param, std::span<const float> grad, double lr, float mu) {
  const Member& m = shapes_[k];
  const int64_t n = static_cast<int64_t>(param.size());
  std::span<float> u(update_.data(), param.size());
  // The banked path keeps gradient, momentum and update in bf16 (in the bf16 numerics).
  const bool bf16_state = m.bank && options_.numerics == MuonNumerics::BF16;
  if (bf16_state) {
    nesterov_all(u, grad, momentum_[k], mu, RoundBf16{});
    if (options_.row_normalize) normalize_rows(u, m.slices * m.rows, m.cols, RoundBf16{});
  } else {
    nesterov_all(u, grad, momentum_[k], mu, KeepF32{});
    if (options_.row_normalize) normalize_rows(u, m.slices * m.rows, m.cols, KeepF32{});
  }
  newton_schulz_batched(u, m.slices, m.rows, m.cols, options_.ns_steps, options_.numerics,
                        m.bank ? NsForm::SquareThenScale : NsForm::ScaleThenSquare);

  const double shape_scale = std::sqrt(std::max(1.0, static_cast<double>(m.rows) / static_cast<double>(m.cols)));
  const float decay = static_cast<float>(1.0 - lr * options_.weight_decay);
  float alpha;
  if (m.bank) {
    alpha = static_cast<float>(-lr * shape_scale);
  } else {
    // `g *= scale` on the orthogonalised update, stored in the update's precision.
    const float s = static_cast<float>(shape_scale);
    const bool bf16 = options_.numerics == MuonNumerics::BF16;
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
    for (int64_t i = 0; i < n; ++i) u[i] = bf16 ? round_to_bf16(u[i] * s) : u[i] * s;
    alpha = static_cast<float>(-lr);
  }
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
  for (int64_t i = 0; i < n; ++i) param[i] = decayed_step(param[i], u[i], decay, alpha);
}

}  // namespace pgolf::optim
