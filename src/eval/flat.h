// Flat (non-overlapping) evaluation (SPEC §6.1): the validation stream cut into consecutive
// sequences of T_eval tokens, every target scored once by the eval-mode forward, loss / targets /
// bytes summed in fp64 and all-reduced. This is the references' periodic validation, their final
// "val_loss / val_bpb" and their round-trip numbers; with document isolation and the per-rank
// truncation it is #1530 / S1560's "diagnostic" evaluation.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "data/bpb.h"

namespace pgolf {

class Communicator;
class Engine;

// The run's gradient accumulation: grad_accum_steps, or 8 / world_size when it is 0 (the references'
// rule; world_size must then divide 8). It splits the training batch and the validation batch.
int resolve_grad_accum(const Config& c, int world_size);

// T_eval = max(train_seq_len, eval_seq_len) (SPEC §2.5; eval_seq_len 0 = unset).
int64_t resolve_eval_seq_len(const Config& c);

// Evaluation tokens from the shards of `glob` (SPEC §2.5): all shards in name order, truncated to a
// whole number of T_eval sequences (+ 1 token), then, when val_max_tokens > 0, to the first whole
// sequences holding at most val_max_tokens targets (quick runs on a prefix).
std::vector<uint16_t> load_eval_tokens(const std::string& glob, const Config& c);

struct FlatEvalOptions {
  int64_t seq_len = 1024;          // T_eval
  int64_t batch_tokens = 524288;   // val_batch_tokens, over all ranks and accumulation steps
  int grad_accum = 1;              // a rank's batch is batch_tokens / (world_size · grad_accum) tokens
  bool doc_isolated = false;       // attention within documents: segments start at BOS, cut every seq_len
  int64_t rank_seq_multiple = 0;   // > 0: each rank's range truncated to a multiple of this many sequences
  int bos_id = 1;                  // the document separator (doc_isolated)

  // val_batch_tokens, val_doc_isolated, val_rank_seq_multiple and T_eval from the preset.
  static FlatEvalOptions from_config(const Config& c, int grad_accum, int bos_id);

  // The sequences [begin, end) that `rank` of `world` scores out of `total_seqs`.
  std::pair<int64_t, int64_t> rank_range(int64_t total_seqs, int rank, int world) const;
  // Fails, naming `what` and the settings, when no rank would score anything from `tokens` (the
  // truncated stream) — checked before training, so a run does not end in an empty evaluation.
  void check_scores_something(std::span<const uint16_t> tokens, int world, const std::string& what) const;
};

struct FlatEvalResult {
  double val_loss = 0.0;  // mean natural-log cross-entropy per target
  double val_bpb = 0.0;   // bits per byte (SPEC §2.6)
  int64_t tokens = 0;     // targets scored, all ranks
  int64_t bytes = 0;      // their bytes, all ranks
  double seconds = 0.0;   // wall time of the evaluation on this rank
};

// Evaluates `tokens` (the truncated stream: a whole number of seq_len sequences + 1 token). With S
// sequences and W ranks, rank r scores sequences [⌊S·r/W⌋, ⌊S·(r+1)/W⌋) in batches of
// batch_tokens / (W · grad_accum) tokens through Engine::token_losses. Every rank gets the same
// result. A collective: every rank calls it.
FlatEvalResult evaluate_flat(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                             const ByteTables& tables, const FlatEvalOptions& options);

}  // namespace pgolf
