#include "optim/muon.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/half.h"
#include "dist/communicator.h"
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
void nesterov_all(std::span<float> u, std::span<const float> g, std::span<float> buf, float mu, Round round) {
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

void Muon::step(ParamSet<float>& params, const ParamSet<float>& grads, double lr_scale, double momentum,
                Communicator* comm) {
  const double lr = options_.lr * lr_scale;
  const float mu = static_cast<float>(momentum);
  const bool sharded = comm != nullptr && comm->world_size() > 1;
  for (size_t k = 0; k < members_.size(); ++k) {
    std::span<float> param = params[members_[k]];
    std::span<const float> grad = grads[members_[k]];
    if (sharded && shapes_[k].bank) {
      step_bank_sharded(k, param, grad, lr, mu, *comm);
    } else {
      std::span<float> u(update_.data(), param.size());
      orthogonalized_update(k, 0, shapes_[k].slices, grad, u, mu);
      apply_update(k, param, u, lr);
    }
  }
}

void Muon::orthogonalized_update(size_t k, int64_t first, int64_t count, std::span<const float> g,
                                 std::span<float> u, float mu) {
  const Member& m = shapes_[k];
  const int64_t slice = m.rows * m.cols;
  PG_CHECK(count == 0 || (first >= 0 && count > 0 && first + count <= m.slices && g.size() == u.size() &&
                          static_cast<int64_t>(u.size()) == count * slice),
           "Muon: slices [{}, {}) of a member with {} slices, {} gradient and {} update values", first, first + count,
           m.slices, g.size(), u.size());
  if (count == 0) return;  // a rank whose shard is all padding
  std::span<float> buf = std::span<float>(momentum_[k]).subspan(static_cast<size_t>(first * slice), u.size());
  // The banked path keeps gradient, momentum and update in bf16 (in the bf16 numerics).
  const bool bf16_state = m.bank && options_.numerics == MuonNumerics::BF16;
  if (bf16_state) {
    nesterov_all(u, g, buf, mu, RoundBf16{});
    if (options_.row_normalize) normalize_rows(u, count * m.rows, m.cols, RoundBf16{});
  } else {
    nesterov_all(u, g, buf, mu, KeepF32{});
    if (options_.row_normalize) normalize_rows(u, count * m.rows, m.cols, KeepF32{});
  }
  newton_schulz_batched(u, count, m.rows, m.cols, options_.ns_steps, options_.numerics,
                        m.bank ? NsForm::SquareThenScale : NsForm::ScaleThenSquare);
  if (!m.bank) {
    // `g *= scale` on the orthogonalised update, stored in the update's precision.
    const float s = static_cast<float>(std::sqrt(std::max(1.0, static_cast<double>(m.rows) / static_cast<double>(m.cols))));
    const bool bf16 = options_.numerics == MuonNumerics::BF16;
    const int64_t n = static_cast<int64_t>(u.size());
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
    for (int64_t i = 0; i < n; ++i) u[i] = bf16 ? round_to_bf16(u[i] * s) : u[i] * s;
  }
}

void Muon::apply_update(size_t k, std::span<float> param, std::span<const float> u, double lr) const {
  const Member& m = shapes_[k];
  const double shape_scale = std::sqrt(std::max(1.0, static_cast<double>(m.rows) / static_cast<double>(m.cols)));
  const float decay = static_cast<float>(1.0 - lr * options_.weight_decay);
  // Banks: the shape scale multiplies the learning rate; matrices carry it in their update.
  const float alpha = static_cast<float>(m.bank ? -lr * shape_scale : -lr);
  const int64_t n = static_cast<int64_t>(param.size());
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
  for (int64_t i = 0; i < n; ++i) param[i] = decayed_step(param[i], u[i], decay, alpha);
}

void Muon::step_bank_sharded(size_t k, std::span<float> param, std::span<const float> grad, double lr, float mu,
                             Communicator& comm) {
  const Member& m = shapes_[k];
  const int64_t slice = m.rows * m.cols;
  const SliceShard shard = SliceShard::of(m.slices, comm.rank(), comm.world_size());
  const size_t shard_values = static_cast<size_t>(shard.per_rank * slice);
  const size_t padded_values = shard_values * static_cast<size_t>(comm.world_size());
  // Reduce-scatter the zero-padded local gradient: bf16 in the bf16 numerics (as the references
  // send it), fp32 otherwise.
  std::vector<float> g_shard(shard_values);
  if (options_.numerics == MuonNumerics::BF16) {
    std::vector<uint16_t> send(padded_values, 0), recv(shard_values);
    for (size_t i = 0; i < grad.size(); ++i) send[i] = f32_to_bf16_bits(grad[i]);
    comm.reduce_scatter(send.data(), recv.data(), shard_values, DType::BF16, ReduceOp::Avg);
    for (size_t i = 0; i < shard_values; ++i) g_shard[i] = bf16_bits_to_f32(recv[i]);
  } else {
    std::vector<float> send(padded_values, 0.0f);
    std::copy(grad.begin(), grad.end(), send.begin());
    comm.reduce_scatter(send.data(), g_shard.data(), shard_values, DType::F32, ReduceOp::Avg);
  }
  const size_t owned = static_cast<size_t>(shard.count * slice);
  std::vector<float> u_shard(shard_values, 0.0f), u_full(padded_values);
  orthogonalized_update(k, shard.first, shard.count, std::span<const float>(g_shard).first(owned),
                        std::span<float>(u_shard).first(owned), mu);
  comm.all_gather(u_shard.data(), u_full.data(), shard_values, DType::F32);
  apply_update(k, param, std::span<const float>(u_full).first(param.size()), lr);
}

void Muon::gather_bank_momentum(size_t k, Communicator& comm, std::span<float> full) const {
  const Member& m = shapes_[k];
  PG_CHECK(m.bank && full.size() == momentum_[k].size(), "gather_bank_momentum: member {} is not a bank of {} values",
           k, full.size());
  const int64_t slice = m.rows * m.cols;
  const SliceShard shard = SliceShard::of(m.slices, comm.rank(), comm.world_size());
  const size_t shard_values = static_cast<size_t>(shard.per_rank * slice);
  std::vector<float> mine(shard_values, 0.0f), all(shard_values * static_cast<size_t>(comm.world_size()));
  if (shard.count > 0) std::copy_n(momentum_[k].begin() + shard.first * slice, shard.count * slice, mine.begin());
  comm.all_gather(mine.data(), all.data(), shard_values, DType::F32);
  std::copy_n(all.begin(), full.size(), full.begin());
}

}  // namespace pgolf::optim
