// Sliding-window evaluation (SPEC §6.2): windows of T tokens every `stride` tokens, each right-padded
// to T (padding unscored) and scored in part per the window rule, `batch_seqs` windows per forward
// (one window per batch row, so the position-0 rules of the stacks restart at every window), the
// windows split contiguously over ranks. Score-first TTT (eval/ttt_chunked.h) scores with the same code.
#pragma once

#include <cstdint>
#include <span>

#include "core/config.h"
#include "eval/ledger.h"
#include "eval/result.h"
#include "eval/windows.h"

namespace pgolf {

class Communicator;
class Engine;

struct SlidingOptions {
  int64_t seq_len = 2048;  // T: the window
  int64_t stride = 64;
  WindowRule rule = WindowRule::Reference;
  int64_t batch_seqs = 32;  // windows per forward

  // eval_stride, sliding_rule, eval_batch_seqs; the window is T_eval (given: it depends on two keys).
  static SlidingOptions from_config(const Config& c, int64_t seq_len);
};

// Scores windows [windows.begin, windows.end) of `plan` on this rank, through the ledger.
void score_windows(Engine& engine, ScoringLedger& ledger, std::span<const uint16_t> tokens, const WindowPlan& plan,
                   IndexRange windows, int64_t batch_seqs);

// The sliding-window evaluation of `tokens` (N + 1 tokens). A collective: every rank calls it and
// gets the same sums.
EvalOutcome evaluate_sliding(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                             const ByteTables& tables, const SlidingOptions& options,
                             ScoreObserver* observer = nullptr);

}  // namespace pgolf
