// The tiny models of the GPU tests at head dim 64 (so the flash attention kernels run): each stack's
// preset with 2 query heads, 1 KV head, d = 128, vocab 128 and the tiny models' features, and a batch
// of 2 rows of 80 tokens.
#pragma once

#include <string>
#include <vector>

#include "core/config.h"
#include "core/rng.h"
#include "model/batch.h"
#include "model/config.h"

namespace pgolf::test {

inline Config tiny64_preset(const std::string& stack) {
  const bool trigram = stack == "s562_trigram";
  Config c = Config::load(trigram ? "s562" : stack);
  c.set("vocab_size", int64_t{128});
  c.set("model_dim", int64_t{128});
  c.set("num_heads", int64_t{2});
  c.set("num_kv_heads", int64_t{1});
  c.set("mlp_mult", 2.0);
  if (stack == "baseline" || stack == "s600") c.set("num_layers", int64_t{3});
  if (stack == "s691" || stack == "s562" || trigram) {
    c.set("num_layers", int64_t{4});
    c.set("rope_dims", int64_t{16});
    c.set("xsa_last_n", int64_t{2});
    c.set("bigram_vocab_size", int64_t{61});
    c.set("bigram_dim", int64_t{16});
  }
  if (stack == "s691") {
    c.set("rope_ntk_ref_len", int64_t{32});  // NTK base active at T = 80
    c.set("ve_dim", int64_t{16});
    c.set("ve_layers", std::vector<int64_t>{2, 3});
  }
  if (trigram) c.set("trigram_hash", true);
  if (stack == "s600") c.set("bigram_direct_size", int64_t{50});
  if (stack == "s1560") {
    c.set("num_layers", int64_t{5});
    c.set("rope_dims", int64_t{16});
    c.set("xsa_last_n", int64_t{5});
    c.set("num_loops", int64_t{1});
    c.set("loop_start", int64_t{1});
    c.set("loop_end", int64_t{2});
    c.set("parallel_start_layer", int64_t{3});
  }
  return c;
}

inline ModelConfig tiny64_config(const std::string& stack) { return ModelConfig::from_config(tiny64_preset(stack)); }

// `rows` rows of `seq_len` random ids and targets, one segment per row.
inline Batch random_rows(int vocab, int64_t rows, int64_t seq_len, uint64_t seed) {
  Batch b;
  b.rows = rows;
  b.seq_len = seq_len;
  Rng rng(seed);
  for (int64_t i = 0; i < b.tokens(); ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  return b;
}

// 2 rows of 80 tokens; packed: segments cut mid-row, of length 1, and an empty padding segment.
inline Batch batch64(int vocab, bool packed, uint64_t seed) {
  Batch b = random_rows(vocab, 2, 80, seed);
  if (packed) b.cu_seqlens = {0, 5, 69, 80, 81, 133, 160, 160};
  return b;
}

}  // namespace pgolf::test
