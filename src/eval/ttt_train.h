// Training passes of test-time training over the base weights, shared by score-first chunked TTT
// (SPEC §6.3), the s562 pre-evaluation form (§6.4) and the phased global SGD (§6.7): sequences of T
// tokens split contiguously over ranks, several epochs, batches of `batch_seqs` sequences, one
// Engine::ttt_step (gradients averaged over ranks, clipped) per batch.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "model/batch.h"

namespace pgolf {

class Communicator;
class Engine;
struct TttOptimizerConfig;

// The TTT optimizer state of the engine (and late-QAT fake quant of the training forwards, SPEC
// §4.7) for the lifetime of the object.
class TttSession {
 public:
  TttSession(Engine& engine, const TttOptimizerConfig& optimizer, bool qat);
  ~TttSession();
  TttSession(const TttSession&) = delete;
  TttSession& operator=(const TttSession&) = delete;

 private:
  Engine& engine_;
};

// `rows` rows of T tokens from aligned input / target spans (rows·T each). bos_id >= 0 isolates
// documents: attention segments start at every row start and at every BOS input (SPEC §6.6).
Batch sequence_batch(std::span<const uint16_t> inputs, std::span<const uint16_t> targets, int64_t rows, int64_t T,
                     int bos_id = -1);

// ½(1 + cos(π·i/n)), the cosine LR factors of TTT; 1 when n = 0.
double cosine_scale(int64_t i, int64_t n);

// Steps of one epoch over `total_seqs` sequences on this rank: ⌈its slice / batch_seqs⌉. Every step
// all-reduces gradients, so every rank must take as many: throws (naming the counts) when the split
// would give ranks different step counts (the references would deadlock there).
int64_t ttt_steps_per_epoch(int64_t total_seqs, int64_t batch_seqs, const Communicator& comm);

// One training pass: this rank's slice of sequences [0, total_seqs), `epochs` times, in batches of
// `batch_seqs`. make_batch(first_seq, n) builds the batch of sequences [first_seq, first_seq + n) (and
// checks it against the scoring ledger); lr_scale(k) is the LR factor of the pass's k-th step.
// Returns the number of steps taken.
int64_t train_sequences(Engine& engine, const Communicator& comm, int64_t total_seqs, int64_t batch_seqs,
                        int64_t epochs, const std::function<Batch(int64_t, int64_t)>& make_batch,
                        const std::function<double(int64_t)>& lr_scale);

}  // namespace pgolf
