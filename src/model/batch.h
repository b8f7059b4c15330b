// One batch of the model: B rows of T tokens (the references' [B, T] input), their targets, and the
// attention segments. Position-0 rules (bigram reserved bucket, SmearGate's zero predecessor) and
// RoPE positions are per row; attention is causal within each segment of `cu_seqlens`.
// The training loaders (data/loaders.h) produce it: dense loaders give rows = n_local / T sequences
// of T tokens with cu_seqlens [0, T, ..., rows·T]; document packing gives one flat row (rows = 1,
// seq_len = n_local) whose segments start at every BOS, are cut every max_doc_len tokens and are
// padded with the total to a multiple of 64 entries (zero-length segments).
#pragma once

#include <cstdint>
#include <vector>

namespace pgolf {

struct Batch {
  int64_t rows = 0;                 // B
  int64_t seq_len = 0;              // T
  std::vector<int32_t> inputs;      // [B·T] token ids
  std::vector<int32_t> targets;     // [B·T] next-token ids; empty = forward without a loss
  std::vector<int32_t> cu_seqlens;  // segment starts + total (FlashAttention varlen); empty = one segment per row
  int32_t max_seqlen = 0;           // the longest segment (T for dense rows); 0 = not computed
  // Which losses the caller of Engine::token_losses will read: per row r, positions [losses_from[r], T)
  // (a value in [0, T]); empty = every position. An engine may compute fewer losses then (the CUDA
  // engine runs the last layer's query side and the head on those positions only) and leaves the
  // others unspecified (NaN on the GPU). Training and backward passes ignore it.
  std::vector<int32_t> losses_from;

  int64_t tokens() const { return rows * seq_len; }
  // The segments attention uses: cu_seqlens, or [0, T, 2T, ..., B·T] when it is empty.
  std::vector<int32_t> segments() const;
  // Checks sizes, id ranges against `vocab`, and that every segment lies inside one row.
  void validate(int vocab) const;
};

// `batch` cut into consecutive batches of at most max_tokens tokens, for forward-only work (token
// losses, Hessians), where rows and segments are independent: runs of whole rows when a row fits;
// a single row longer than max_tokens (document packing, document-isolated evaluation) is cut at
// segment ends into rows of whole segments, each padded with its total to a multiple of 64
// cu_seqlens entries. Positions restart per row, so a segment moved to a new row keeps its
// position differences (RoPE depends only on them). An error when a row of a multi-row batch, or a
// segment, is longer than max_tokens. The pieces' targets follow their inputs, and so does losses_from for
// runs of whole rows (a cut row drops it).
std::vector<Batch> split_batch(const Batch& batch, int64_t max_tokens);

}  // namespace pgolf
