#include "eval/ttt_chunked.h"

#include <fmt/format.h>

#include "dist/communicator.h"
#include "eval/ttt_train.h"
#include "eval/windows.h"

namespace pgolf {

ChunkedTttOptions ChunkedTttOptions::from_config(const Config& c, int64_t seq_len, bool adamw) {
  ChunkedTttOptions o;
  o.pre_eval = c.get_bool("ttt_pre_eval");
  o.scoring = SlidingOptions::from_config(c, seq_len);
  if (!o.pre_eval) o.scoring.rule = WindowRule::Clean;
  o.chunk_tokens = c.get_int("ttt_chunk_tokens");
  o.epochs = c.get_int("ttt_epochs");
  o.batch_seqs = c.get_int("ttt_batch_seqs");
  const std::string cosine = c.get_string("ttt_cosine");
  PG_CHECK(cosine == "chunks" || cosine == "steps", "ttt_cosine = \"{}\": expected chunks or steps", cosine);
  o.cosine_per_step = cosine == "steps";
  o.qat = c.get_bool("ttt_qat");
  TttOptimizerConfig& opt = o.optimizer;
  opt.lr = c.get_double("ttt_lr");
  opt.grad_clip = c.get_double("ttt_grad_clip");
  opt.freeze_blocks = static_cast<int>(c.get_int("ttt_freeze_blocks"));
  if (adamw) {
    // s562's TTT: torch AdamW defaults (betas 0.9/0.999, eps 1e-8, no weight decay) and its three groups.
    opt.kind = TttOptimizerConfig::Kind::AdamW;
    opt.beta1 = 0.9;
    opt.beta2 = 0.999;
    opt.eps = 1e-8;
    opt.weight_decay = 0.0;
    opt.proj_lr_mult = 3.0;
    opt.fc_lr_mult = 0.5;
  } else {
    opt.kind = TttOptimizerConfig::Kind::Sgd;
    opt.momentum = c.get_double("ttt_momentum");
  }
  PG_CHECK(o.epochs >= 0 && o.batch_seqs > 0, "ttt_epochs = {} and ttt_batch_seqs = {}: expected >= 0 and > 0",
           o.epochs, o.batch_seqs);
  return o;
}

namespace {

// The batch of stream sequences [first_seq, first_seq + n) from target `base`, checked trainable.
Batch stream_sequences(const ScoringLedger& ledger, std::span<const uint16_t> tokens, int64_t base, int64_t first_seq,
                       int64_t n, int64_t T) {
  const int64_t first = base + first_seq * T;
  ledger.require_trainable({first, n * T});
  return sequence_batch(tokens.subspan(static_cast<size_t>(first)), tokens.subspan(static_cast<size_t>(first) + 1),
                        n, T);
}

EvalOutcome score_first(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens, const ByteTables& tables,
                        const ChunkedTttOptions& o, ScoreObserver* observer, EvalOutcome out) {
  const int64_t T = o.scoring.seq_len;
  const WindowPlan windows(out.stream_targets, T, o.scoring.stride, o.scoring.rule);
  const ChunkPlan chunks(windows, o.chunk_tokens);
  ScoringLedger ledger(tokens, tables, ScoringLedger::Policy::ScoreFirst, observer);
  const int64_t last = chunks.size() - 1;
  // Steps of the whole run (per-step cosine): every trained chunk has the same number of steps.
  int64_t total_steps = 0;
  for (int64_t c = 0; c < last; ++c)
    total_steps += o.epochs * ttt_steps_per_epoch(chunks.training_sequences(c, T), o.batch_seqs, comm);
  int64_t steps_done = 0;
  for (int64_t c = 0; c <= last; ++c) {
    auto t0 = EvalClock::now();
    const IndexRange w = chunks.windows(c);
    const IndexRange mine = rank_slice(w.size(), comm.rank(), comm.world_size());
    score_windows(engine, ledger, tokens, windows, {w.begin + mine.begin, w.begin + mine.end}, o.scoring.batch_seqs);
    out.score_seconds += seconds_since(t0);
    if (c == last) break;
    t0 = EvalClock::now();
    const IndexRange targets = chunks.targets(c);
    const TargetRange chunk_range{targets.begin, targets.size()};
    ledger.release(comm, std::span<const TargetRange>(&chunk_range, 1));
    const double chunk_scale = cosine_scale(c, last);
    steps_done += train_sequences(
        engine, comm, chunks.training_sequences(c, T), o.batch_seqs, o.epochs,
        [&](int64_t s, int64_t n) { return stream_sequences(ledger, tokens, targets.begin, s, n, T); },
        [&](int64_t k) { return o.cosine_per_step ? cosine_scale(steps_done + k, total_steps) : chunk_scale; });
    out.train_seconds += seconds_since(t0);
  }
  out.sums = ledger.global_sums(comm);
  out.note = fmt::format("chunks:{} chunk_tokens:{} window:{} stride:{} rule:{} epochs:{} steps:{}", chunks.size(),
                         o.chunk_tokens, T, o.scoring.stride, window_rule_name(o.scoring.rule), o.epochs, steps_done);
  return out;
}

EvalOutcome pre_eval(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens, const ByteTables& tables,
                     const ChunkedTttOptions& o, ScoreObserver* observer, EvalOutcome out) {
  const int64_t T = o.scoring.seq_len;
  ScoringLedger ledger(tokens, tables, ScoringLedger::Policy::PreEvalNotLegal, observer);
  // Train on every whole T-sequence of the stream first: exactly what the legality rules forbid.
  auto t0 = EvalClock::now();
  const int64_t seqs = out.stream_targets / T;
  const int64_t total_steps = o.epochs * ttt_steps_per_epoch(seqs, o.batch_seqs, comm);
  const int64_t steps = train_sequences(
      engine, comm, seqs, o.batch_seqs, o.epochs,
      [&](int64_t s, int64_t n) { return stream_sequences(ledger, tokens, 0, s, n, T); },
      [&](int64_t k) { return cosine_scale(k, total_steps); });
  out.train_seconds = seconds_since(t0);
  t0 = EvalClock::now();
  const WindowPlan windows(out.stream_targets, T, o.scoring.stride, o.scoring.rule);
  score_windows(engine, ledger, tokens, windows, rank_slice(windows.size(), comm.rank(), comm.world_size()),
                o.scoring.batch_seqs);
  out.score_seconds = seconds_since(t0);
  const WindowPlan::Totals totals = windows.totals();
  out.rescored = totals.scored_positions - totals.distinct_targets;
  out.sums = ledger.global_sums(comm);
  out.legal = ledger.legal();
  out.note = fmt::format("{}; trained {} epochs ({} steps) on all {} validation sequences, then window:{} stride:{} "
                         "rule:{}",
                         kNotLegalLabel, o.epochs, steps, seqs, T, o.scoring.stride, window_rule_name(o.scoring.rule));
  return out;
}

}  // namespace

EvalOutcome evaluate_ttt_chunked(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                                 const ByteTables& tables, const ChunkedTttOptions& o, ScoreObserver* observer) {
  PG_CHECK(tokens.size() >= 2, "TTT evaluation of a stream of {} tokens", tokens.size());
  EvalOutcome out;
  out.mode = o.optimizer.kind == TttOptimizerConfig::Kind::AdamW ? "ttt-adamw" : "ttt-sgd";
  if (o.pre_eval) out.mode += "-pre-eval";
  out.stream_targets = static_cast<int64_t>(tokens.size()) - 1;
  const TttSession session(engine, o.optimizer, o.qat);
  return o.pre_eval ? pre_eval(engine, comm, tokens, tables, o, observer, std::move(out))
                    : score_first(engine, comm, tokens, tables, o, observer, std::move(out));
}

}  // namespace pgolf
