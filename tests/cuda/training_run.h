// The short training run of the GPU training tests: a small s691-style model (d 128, 2 heads of 64,
// so the flash attention kernels run; 4 layers with XSA, BigramHash, SmearGate, value embeddings)
// trained on consecutive windows of the FineWeb validation prefix.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "core/config.h"
#include "model/batch.h"
#include "model/config.h"

namespace pgolf::test {

inline ModelConfig small_s691() {
  Config c = Config::load("s691");
  c.set("model_dim", int64_t{128});
  c.set("num_heads", int64_t{2});
  c.set("num_kv_heads", int64_t{1});
  c.set("num_layers", int64_t{4});
  c.set("mlp_mult", 2.0);
  c.set("rope_ntk_ref_len", int64_t{128});  // NTK base active at T = 256, as the preset's 1024 at 2048
  c.set("xsa_last_n", int64_t{2});
  c.set("bigram_dim", int64_t{32});
  c.set("ve_dim", int64_t{32});
  c.set("ve_layers", std::vector<int64_t>{2, 3});
  return ModelConfig::from_config(c);
}

// Step s: rows consecutive windows of T + 1 tokens (inputs and next-token targets).
inline Batch batch_at(std::span<const uint16_t> tokens, int step, int rows, int T) {
  Batch b;
  b.rows = rows, b.seq_len = T;
  for (int r = 0; r < rows; ++r) {
    const size_t start = (static_cast<size_t>(step) * rows + r) * (T + 1);
    for (int t = 0; t < T; ++t) {
      b.inputs.push_back(tokens[start + t]);
      b.targets.push_back(tokens[start + t + 1]);
    }
  }
  return b;
}

}  // namespace pgolf::test
