#include "eval/sliding.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "dist/communicator.h"
#include "model/engine.h"

namespace pgolf {

SlidingOptions SlidingOptions::from_config(const Config& c, int64_t seq_len) {
  SlidingOptions o;
  o.seq_len = seq_len;
  o.stride = c.get_int("eval_stride");
  o.rule = parse_window_rule(c.get_string("sliding_rule"));
  o.batch_seqs = c.get_int("eval_batch_seqs");
  PG_CHECK(o.batch_seqs > 0, "eval_batch_seqs = {} must be positive", o.batch_seqs);
  return o;
}

void score_windows(Engine& engine, ScoringLedger& ledger, std::span<const uint16_t> tokens, const WindowPlan& plan,
                   IndexRange windows, int64_t batch_seqs) {
  const int64_t T = plan.window();
  std::vector<float> nll;
  Batch b;
  // The windows [k0, k0 + rows) of a submitted forward, scored once its NLL is collected (after the
  // next forward is submitted: building a batch and scoring overlap the engine's work).
  const auto score = [&](int64_t k0, int64_t rows) {
    engine.collect(nll);
    PG_CHECK(static_cast<int64_t>(nll.size()) == rows * T, "sliding: {} losses for {} windows of {}", nll.size(),
             rows, T);
    for (int64_t r = 0; r < rows; ++r) {
      const Window w = plan.at(k0 + r);
      ledger.score(w.first_scored(), std::span<const float>(nll).subspan(static_cast<size_t>(r * T + w.score_begin),
                                                                         static_cast<size_t>(w.scored())));
    }
  };
  PG_CHECK(engine.pending() == 0, "sliding: the engine has {} uncollected calls", engine.pending());
  const PendingCalls drain(engine);
  int64_t pending_k0 = -1, pending_rows = 0;
  for (int64_t k0 = windows.begin; k0 < windows.end; k0 += batch_seqs) {
    const int64_t rows = std::min(batch_seqs, windows.end - k0);
    // [rows, T] inputs and targets, right-padded with id 0 (padding is never scored).
    b.rows = rows;
    b.seq_len = T;
    b.max_seqlen = static_cast<int32_t>(T);
    b.inputs.assign(static_cast<size_t>(rows * T), 0);
    b.targets.assign(static_cast<size_t>(rows * T), 0);
    b.losses_from.resize(static_cast<size_t>(rows));  // only the scored positions are read
    for (int64_t r = 0; r < rows; ++r) {
      const Window w = plan.at(k0 + r);
      std::copy_n(tokens.begin() + w.start, w.len, b.inputs.begin() + r * T);
      std::copy_n(tokens.begin() + w.start + 1, w.len, b.targets.begin() + r * T);
      b.losses_from[static_cast<size_t>(r)] = static_cast<int32_t>(w.score_begin);
    }
    engine.submit_token_losses(b);
    if (pending_k0 >= 0) score(pending_k0, pending_rows);
    pending_k0 = k0;
    pending_rows = rows;
  }
  if (pending_k0 >= 0) score(pending_k0, pending_rows);
}

EvalOutcome evaluate_sliding(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                             const ByteTables& tables, const SlidingOptions& options, ScoreObserver* observer) {
  const auto t0 = EvalClock::now();
  const int64_t n_targets = static_cast<int64_t>(tokens.size()) - 1;
  const WindowPlan plan(n_targets, options.seq_len, options.stride, options.rule);
  // Only the reference rule rescores targets (its truncated tail windows); every other rule scores once.
  ScoringLedger ledger(tokens, tables,
                       options.rule == WindowRule::Reference ? ScoringLedger::Policy::ReferenceRescoring
                                                             : ScoringLedger::Policy::ScoreFirst,
                       observer);
  score_windows(engine, ledger, tokens, plan, rank_slice(plan.size(), comm.rank(), comm.world_size()),
                options.batch_seqs);
  EvalOutcome out;
  out.mode = "sliding";
  out.sums = ledger.global_sums(comm);
  const WindowPlan::Totals totals = plan.totals();
  out.rescored = totals.scored_positions - totals.distinct_targets;
  out.stream_targets = n_targets;
  out.score_seconds = seconds_since(t0);
  out.note = fmt::format("window:{} stride:{} rule:{} windows:{}", options.seq_len, options.stride,
                         window_rule_name(options.rule), plan.size());
  return out;
}

}  // namespace pgolf
