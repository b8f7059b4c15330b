// Bits per byte, exactly as every reference script counts it (SPEC 2.6), and the validation
// token stream (SPEC 2.5).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/fs.h"

namespace pgolf {

// Per-id byte tables, built from the SentencePiece model (Tokenizer::byte_tables), size
// max(sp_vocab, V). A target t after the input token p is worth
//   bytes(t | p) = base_bytes[t] + (has_leading_space[t] && !is_boundary[p])
// bytes: the '▁' of a piece counts as the space it stands for unless it follows a document start.
struct ByteTables {
  std::vector<int32_t> base_bytes;        // UTF-8 length without the leading '▁'; 1 for byte pieces; 0 for control
  std::vector<uint8_t> has_leading_space;  // the piece starts with '▁' (U+2581)
  std::vector<uint8_t> is_boundary;        // control / unknown / unused pieces and ids >= sp_vocab

  int64_t size() const { return static_cast<int64_t>(base_bytes.size()); }

  int64_t bytes(int64_t prev, int64_t target) const {
    PG_CHECK(prev >= 0 && prev < size() && target >= 0 && target < size(),
             "token ids ({}, {}) outside the byte tables of size {}", prev, target, size());
    return base_bytes[target] + ((has_leading_space[target] && !is_boundary[prev]) ? 1 : 0);
  }
};

struct TargetBytes {
  int64_t targets = 0;
  int64_t bytes = 0;
};

// Bytes of the aligned (prev[i], target[i]) pairs; the spans must have equal length.
template <typename Id>
TargetBytes count_target_bytes(const ByteTables& tables, std::span<const Id> prev, std::span<const Id> target) {
  PG_CHECK(prev.size() == target.size(), "count_target_bytes: {} inputs but {} targets", prev.size(), target.size());
  TargetBytes r;
  r.targets = static_cast<int64_t>(target.size());
  for (size_t i = 0; i < target.size(); ++i) r.bytes += tables.bytes(prev[i], target[i]);
  return r;
}

// Bytes of the targets of a token stream: every token but the first, each after its predecessor.
template <typename Id>
TargetBytes count_stream_bytes(const ByteTables& tables, std::span<const Id> tokens) {
  if (tokens.size() < 2) return {};
  return count_target_bytes(tables, tokens.first(tokens.size() - 1), tokens.subspan(1));
}

// Sums (loss, targets, bytes) over evaluation pieces and ranks, in fp64 as the references do.
struct BpbAccumulator {
  double loss_sum = 0.0;  // sum of per-target natural-log cross-entropies
  double tokens = 0.0;    // scored targets
  double bytes = 0.0;     // their bytes (SPEC 2.6)

  void add(double loss, double targets, double target_bytes) {
    loss_sum += loss;
    tokens += targets;
    bytes += target_bytes;
  }
  void add(const BpbAccumulator& o) { add(o.loss_sum, o.tokens, o.bytes); }
  double val_loss() const;  // loss_sum / tokens
  double val_bpb() const;   // (val_loss / ln 2) * (tokens / bytes), the references' order of operations
};

// Number of targets kept for evaluation at sequence length T: floor((n_tokens - 1) / T) * T.
int64_t usable_targets(int64_t n_tokens, int64_t seq_len);

// The validation stream (SPEC 2.5): every shard of `files` in name order, concatenated, truncated to
// usable_targets(N, seq_len) + 1 tokens. seq_len <= 0 keeps every token. vocab_size > 0 checks the ids.
std::vector<uint16_t> load_validation_tokens(std::vector<fs::path> files, int64_t seq_len, int64_t vocab_size = 0);

}  // namespace pgolf
