#include "eval/ttt_train.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"
#include "dist/communicator.h"
#include "eval/windows.h"
#include "model/engine.h"

namespace pgolf {

TttSession::TttSession(Engine& engine, const TttOptimizerConfig& optimizer, bool qat) : engine_(engine) {
  engine_.ttt_begin(optimizer);
  engine_.set_qat(qat);
}

TttSession::~TttSession() {
  engine_.set_qat(false);
  engine_.ttt_end();
}

Batch sequence_batch(std::span<const uint16_t> inputs, std::span<const uint16_t> targets, int64_t rows, int64_t T,
                     int bos_id) {
  const size_t n = static_cast<size_t>(rows * T);
  PG_CHECK(rows > 0 && inputs.size() >= n && targets.size() >= n,
           "training batch of {} x {} tokens from {} inputs / {} targets", rows, T, inputs.size(), targets.size());
  Batch b;
  b.rows = rows;
  b.seq_len = T;
  b.inputs.assign(inputs.begin(), inputs.begin() + static_cast<std::ptrdiff_t>(n));
  b.targets.assign(targets.begin(), targets.begin() + static_cast<std::ptrdiff_t>(n));
  b.max_seqlen = static_cast<int32_t>(T);
  if (bos_id < 0) return b;
  int32_t longest = 0;
  for (int64_t i = 0; i < rows * T; ++i) {
    if (i % T == 0 || b.inputs[static_cast<size_t>(i)] == bos_id) {
      if (!b.cu_seqlens.empty()) longest = std::max(longest, static_cast<int32_t>(i) - b.cu_seqlens.back());
      b.cu_seqlens.push_back(static_cast<int32_t>(i));
    }
  }
  longest = std::max(longest, static_cast<int32_t>(rows * T) - b.cu_seqlens.back());
  b.cu_seqlens.push_back(static_cast<int32_t>(rows * T));
  b.max_seqlen = longest;
  return b;
}

double cosine_scale(int64_t i, int64_t n) {
  if (n == 0) return 1.0;
  return 0.5 * (1.0 + std::cos(std::numbers::pi * static_cast<double>(i) / static_cast<double>(n)));
}

int64_t ttt_steps_per_epoch(int64_t total_seqs, int64_t batch_seqs, const Communicator& comm) {
  PG_CHECK(batch_seqs > 0, "TTT batch of {} sequences: must be positive", batch_seqs);
  auto steps_of = [&](int r) {
    return (rank_slice(total_seqs, r, comm.world_size()).size() + batch_seqs - 1) / batch_seqs;
  };
  const int64_t mine = steps_of(comm.rank());
  for (int r = 0; r < comm.world_size(); ++r)
    PG_CHECK(steps_of(r) == mine,
             "TTT: {} sequences in batches of {} over {} ranks give rank {} {} steps and rank {} {}; every rank must "
             "take the same number of steps (each all-reduces its gradients)",
             total_seqs, batch_seqs, comm.world_size(), comm.rank(), mine, r, steps_of(r));
  return mine;
}

int64_t train_sequences(Engine& engine, const Communicator& comm, int64_t total_seqs, int64_t batch_seqs,
                        int64_t epochs, const std::function<Batch(int64_t, int64_t)>& make_batch,
                        const std::function<double(int64_t)>& lr_scale) {
  ttt_steps_per_epoch(total_seqs, batch_seqs, comm);
  const IndexRange mine = rank_slice(total_seqs, comm.rank(), comm.world_size());
  int64_t step = 0;
  for (int64_t e = 0; e < epochs; ++e)
    for (int64_t s = mine.begin; s < mine.end; s += batch_seqs) {
      const Batch b = make_batch(s, std::min(batch_seqs, mine.end - s));
      const double loss = engine.ttt_step(b, lr_scale(step++));
      PG_CHECK(std::isfinite(loss), "TTT step {}: loss is {}", step, loss);
    }
  return step;
}

}  // namespace pgolf
