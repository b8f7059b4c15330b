// One batch of the model: B rows of T tokens (the references' [B, T] input), their targets, and the
// attention segments. Position-0 rules (bigram reserved bucket, SmearGate's zero predecessor) and
// RoPE positions are per row; attention is causal within each segment of `cu_seqlens`.
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

  int64_t tokens() const { return rows * seq_len; }
  // The segments attention uses: cu_seqlens, or [0, T, 2T, ..., B·T] when it is empty.
  std::vector<int32_t> segments() const;
  // Checks sizes, id ranges against `vocab`, and that every segment lies inside one row.
  void validate(int vocab) const;
};

}  // namespace pgolf
