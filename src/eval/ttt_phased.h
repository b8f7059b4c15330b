// The global SGD phase of phased TTT (SPEC §6.7, #1610/#1626): ALL base weights trained on documents
// that the LoRA queue has already scored, concatenated in queue order: chunks of chunk_tokens, per
// chunk `epochs` epochs over its T-token sequences split over ranks (batches of batch_seqs), SGD with
// momentum, cosine LR over chunks, gradients averaged and clipped, attention isolated per document;
// the last chunk is skipped.
#pragma once

#include <cstdint>
#include <span>

#include "eval/documents.h"
#include "eval/ledger.h"
#include "model/engine.h"

namespace pgolf {

struct GlobalSgdOptions {
  int64_t chunk_tokens = 32768;  // ttt_chunk_tokens
  int64_t seq_len = 2048;        // ttt_eval_seq_len
  int64_t epochs = 3;            // ttt_epochs
  int64_t batch_seqs = 32;       // ttt_batch_seqs
  TttOptimizerConfig optimizer;  // SGD: phased_ttt_lr, ttt_momentum, ttt_grad_clip
  int bos_id = 1;
};

// Confirms through the ledger (a collective) that every target of `docs` is scored, then trains.
// Returns the number of optimizer steps.
int64_t global_sgd_phase(Engine& engine, Communicator& comm, ScoringLedger& ledger, std::span<const uint16_t> tokens,
                         std::span<const Document> docs, const GlobalSgdOptions& options);

}  // namespace pgolf
