// Per-document LoRA TTT (SPEC §6.5: LORA17, S600, #1530, S1560) and phased TTT (§6.7: #1610 one
// global SGD phase, #1626 several).
//
// Documents (eval/documents.h) sorted by length are cut into batches of ttt_batch_size and handed out
// longest first through Communicator::fetch_add (a counter shared by the ranks). A batch gets fresh
// adapters and optimizer state (Engine::lora_reset); then for each chunk index ci, one forward over
// [docs, context] scores the chunk positions of the documents that have chunk ci and, in the same
// engine call, trains the adapters on the documents that have a later chunk (per-document mean loss
// over the chunk; the engine computes the losses before it updates, so the chunk is scored before it
// is trained on). ttt_grad_steps > 1 adds steps with fresh forwards on the same, already scored, chunk.
// The rows are the documents in descending order of chunk counts, and a forward holds only the rows
// of documents that still have a chunk (ttt_lora_active_rows; the references run all 64 rows to the
// longest document's end). Row results do not depend on other rows: the scores are the same, the
// work ~ Σ chunks · width instead of 64 · max chunks · width (5.5x less on the FineWeb prefix).
// A wall-clock cap (ttt_max_seconds) stops handing out batches; what is left is reported unscored.
//
// Phased: scoring pauses after the batch holding queue document P_k − 1 (eval/documents.h
// plan_phases); the ledger confirms over all ranks that the first P_k queue documents are scored; SGD
// trains ALL base weights on them (eval/ttt_phased.h); then the queue continues on the new base. The
// base weights change: reload them before evaluating anything else.
#pragma once

#include <cstdint>
#include <span>

#include "core/config.h"
#include "eval/documents.h"
#include "eval/ledger.h"
#include "eval/result.h"
#include "eval/ttt_phased.h"
#include "model/engine.h"
#include "model/lora.h"

namespace pgolf {

struct LoraTttOptions {
  LoraConfig lora;
  LoraOptimizerConfig optimizer;
  int64_t chunk = 256;      // ttt_chunk_size
  int64_t context = 1024;   // ttt_eval_seq_len
  int64_t batch_size = 64;  // documents per batch
  BatchCut batch_cut = BatchCut::Longest;  // ttt_batch_cut
  int64_t grad_steps = 1;   // optimizer steps per chunk
  double max_seconds = 0.0; // 0 = no cap
  bool active_rows = true;  // forward only the documents with chunks left (false: every row, as the references)
  uint64_t seed = 1337;     // adapters of queue batch j are drawn from seed and j (the same on any rank)
  int bos_id = 1;
  int phases = 0;           // 0 = plain LoRA TTT; > 0: phased global SGD
  int64_t prefix_docs = 0;  // phased_ttt_prefix_docs
  GlobalSgdOptions sgd;

  static LoraTttOptions from_config(const Config& c, int bos_id, bool phased);
};

// A collective: every rank calls it and gets the same sums. Marked incomplete when the cap left
// documents unscored.
EvalOutcome evaluate_ttt_lora(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                              const ByteTables& tables, const LoraTttOptions& options,
                              ScoreObserver* observer = nullptr);

}  // namespace pgolf
