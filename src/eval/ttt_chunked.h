// Legal score-first chunked TTT (SPEC §6.3, #549's "PR #461 recipe", S691) with SGD + momentum or
// s562's AdamW recipe (§6.4: per-group LRs, per-step cosine), and — only behind ttt_pre_eval — s562's
// pre-evaluation form, which is NOT LEGAL and labelled so.
//
// Score-first: the stream is cut into chunks of ttt_chunk_tokens; each sliding window belongs to the
// chunk of its first scored target. For every chunk: SCORE its windows (eval mode), have the ledger
// confirm over all ranks that every target of the chunk is scored, then TRAIN on the chunk's
// non-overlapping T-token sequences (split over ranks) for ttt_epochs epochs; the last chunk is scored
// and never trained on. The windows follow the clean rule whatever sliding_rule says: the reference
// rule rescores the last `stride` targets T/stride times, which the legality rules forbid.
// The engine's weights are changed: reload them before evaluating anything else.
#pragma once

#include <cstdint>
#include <span>

#include "core/config.h"
#include "eval/ledger.h"
#include "eval/result.h"
#include "eval/sliding.h"
#include "model/engine.h"

namespace pgolf {

struct ChunkedTttOptions {
  SlidingOptions scoring;      // windows scored per chunk (clean rule)
  int64_t chunk_tokens = 32768;
  int64_t epochs = 3;
  int64_t batch_seqs = 32;     // training sequences per step (per rank)
  TttOptimizerConfig optimizer;
  bool cosine_per_step = false;  // s562: ½(1+cos(π·g/G)) over all G steps; else over chunks (§6.3)
  bool qat = false;              // S691: int6 fake-quant STE in the training forwards (SPEC §4.7)
  bool pre_eval = false;         // s562 pre-evaluation form: NOT LEGAL

  // ttt_* keys; `adamw` picks s562's AdamW groups (".proj." ×3, ".fc." ×0.5, betas 0.9/0.999, eps 1e-8).
  static ChunkedTttOptions from_config(const Config& c, int64_t seq_len, bool adamw);
};

// The score-first evaluation of `tokens` (N + 1 tokens), or with options.pre_eval the pre-evaluation
// form (train on every validation sequence for `epochs` epochs, then score the sliding windows of
// options.scoring with the adapted weights; the outcome is marked not legal). A collective.
EvalOutcome evaluate_ttt_chunked(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                                 const ByteTables& tables, const ChunkedTttOptions& options,
                                 ScoreObserver* observer = nullptr);

}  // namespace pgolf
