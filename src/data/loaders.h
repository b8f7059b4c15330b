// Training data loaders (SPEC 2.4). Each loader reads memory-mapped shards, serves one rank's
// micro-batches, and has a small state of integers (with JSON conversion) from which a resumed run
// continues exactly.
//   SequentialLoader        (a) the shared sequential stream of every stack up to S691
//   DocPackingLoader        (b) document packing with cu_seqlens (#1530 / S1560)
//   ShuffledSequenceLoader  (c) shuffled T-windows, GPTQ calibration (#1530 / S1560)
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <vector>

#include "core/fs.h"
#include "core/rng.h"
#include "data/shard.h"
#include "model/batch.h"

namespace pgolf {

// Every loader returns a `Batch` (model/batch.h): int32 inputs/targets (targets[i] is the token
// after inputs[i]), rows, seq_len, cu_seqlens (always filled here) and max_seqlen.

// Tokens per rank and micro-step: batch_tokens / (world_size * grad_accum), rounded down as the
// references do; throws when that is zero.
int64_t local_batch_tokens(int64_t batch_tokens, int world_size, int grad_accum);

struct DocSegments {
  std::vector<int32_t> cu_seqlens;
  int32_t max_seqlen = 0;
};

// The document-packing segments of a flat buffer of `total` tokens (SPEC 2.4b): a segment starts at
// every BOS position in `bos_positions` (sorted, within [0, total)) and at 0; each document is
// further cut every `max_doc_len` tokens from its start (0 = no cut). cu_seqlens = the starts and
// `total`, padded with `total` to a multiple of `pad_multiple` entries.
DocSegments doc_segments(std::span<const int64_t> bos_positions, int64_t total, int64_t max_doc_len,
                         int64_t pad_multiple = 64);

// ---- (a) sequential stream ----------------------------------------------------------------------

struct StreamState {
  int64_t shard = 0;  // index into the loader's files
  int64_t pos = 0;    // next token of that shard (may equal its size: the next read moves on)
};
void to_json(nlohmann::json& j, const StreamState& s);
void from_json(const nlohmann::json& j, StreamState& s);

// Every rank reads the same stream: shard 0 from token 0, then shard 1, ..., wrapping to shard 0.
// Per micro-step the stream yields world_size * (n_local + 1) tokens; rank r keeps the span
// [r (n_local+1), (r+1)(n_local+1)): x = span[:-1], y = span[1:], as [n_local / T, T].
class SequentialLoader {
 public:
  // `files` in stream order (find_shards() sorts by name); vocab_size > 0 checks every id.
  SequentialLoader(const std::vector<fs::path>& files, int rank, int world_size, int64_t vocab_size = 0);

  Batch next(int64_t batch_tokens, int grad_accum, int64_t seq_len);

  StreamState state() const { return state_; }
  void restore(const StreamState& s);

 private:
  // Moves the stream `n` tokens forward, copying them to `out` when it is not null.
  void advance(int64_t n, uint16_t* out);

  std::vector<Shard> shards_;
  int rank_, world_size_;
  StreamState state_;
};

// ---- (b) document packing ----------------------------------------------------------------------

struct DocPackState {
  int64_t shard = 0;   // index into the loader's files
  int64_t cursor = 0;  // start of the next step's global span in that shard
};
void to_json(nlohmann::json& j, const DocPackState& s);
void from_json(const nlohmann::json& j, DocPackState& s);

// Per micro-step all ranks take a global span of world_size * (n_local + 1) tokens at the cursor;
// rank r's flat buffer starts at cursor + r (n_local + 1); then cursor += the span. A shard is entered
// at its first BOS; when the span would pass the shard's end the rest of the shard is skipped (and
// the next shard entered, wrapping to the first). x, y are one row of n_local tokens with the
// doc_segments() of the BOS positions in x, cut every max_doc_len tokens.
class DocPackingLoader {
 public:
  DocPackingLoader(const std::vector<fs::path>& files, int bos_id, int rank, int world_size, int64_t vocab_size = 0);

  Batch next(int64_t batch_tokens, int grad_accum, int64_t max_doc_len);

  DocPackState state() const { return {shard_, cursor_}; }
  void restore(const DocPackState& s);

 private:
  void enter_shard(int64_t index);  // loads its BOS positions and puts the cursor on its first BOS

  std::vector<Shard> shards_;
  uint16_t bos_id_;
  int rank_, world_size_;
  int64_t shard_ = 0, cursor_ = 0;
  std::vector<int64_t> bos_positions_;  // of the current shard, ascending
};

// ---- (c) shuffled sequences --------------------------------------------------------------------

struct ShuffleState {
  uint64_t epoch_rng_state = 0;  // the generator's state when the current epoch's windows were drawn up
  int64_t drawn = 0;             // sequences served since then
};
void to_json(nlohmann::json& j, const ShuffleState& s);
void from_json(const nlohmann::json& j, ShuffleState& s);

// Rank r owns files r, r + W, r + 2W, ... . An epoch gives every owned shard a random phase in
// [0, T-1] and a random order of its T-token windows starting at that phase; each sequence comes from
// a shard drawn with probability proportional to its remaining windows (the last window of its order
// is served). When every window has been served a new epoch begins. Randomness: Rng(seed).fork(rank)
// (deterministic; not numpy's PCG64 stream).
class ShuffledSequenceLoader {
 public:
  ShuffledSequenceLoader(const std::vector<fs::path>& files, int rank, int world_size, int64_t seq_len, uint64_t seed,
                         int64_t vocab_size = 0);

  Batch next(int64_t batch_tokens, int grad_accum);

  ShuffleState state() const { return {epoch_rng_state_, drawn_}; }
  void restore(const ShuffleState& s);

 private:
  void new_epoch();
  // Serves one window: returns (owned shard index, start token).
  std::pair<size_t, int64_t> draw();

  std::vector<Shard> shards_;  // the owned shards
  int world_size_;
  int64_t seq_len_;
  Rng rng_;
  uint64_t epoch_rng_state_ = 0;
  int64_t drawn_ = 0;
  std::vector<std::vector<int64_t>> starts_;  // per owned shard, the epoch's remaining window starts
};

}  // namespace pgolf
