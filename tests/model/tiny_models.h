// Tiny models of every stack with all of the stack's features switched on, for gradient checks
// and behaviour tests: the stack's preset with small dimensions.
#pragma once

#include <cmath>
#include <string>

#include "core/config.h"
#include "core/rng.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/cpu_model.h"
#include "model/init.h"

namespace pgolf::test {

// Stacks: baseline, s691, s562 (+ trigram: s562_trigram), s600, s1560. The preset with small dimensions.
inline Config tiny_preset(const std::string& stack) {
  const bool trigram = stack == "s562_trigram";
  Config c = Config::load(trigram ? "s562" : stack);
  c.set("vocab_size", int64_t{64});
  c.set("model_dim", int64_t{32});
  c.set("num_heads", int64_t{4});
  c.set("num_kv_heads", int64_t{2});
  c.set("mlp_mult", 2.0);
  if (stack == "baseline" || stack == "s600") c.set("num_layers", int64_t{3});
  if (stack == "s691") {
    // Partial RoPE 4 of 8 with the NTK base active (T = 12 > 8), XSA on 2, VE on layers 2 and 3.
    c.set("num_layers", int64_t{4});
    c.set("rope_dims", int64_t{4});
    c.set("rope_ntk_ref_len", int64_t{8});
    c.set("xsa_last_n", int64_t{2});
    c.set("bigram_vocab_size", int64_t{31});
    c.set("bigram_dim", int64_t{8});
    c.set("ve_dim", int64_t{8});
    c.set("ve_layers", std::vector<int64_t>{2, 3});
  }
  if (stack == "s562" || trigram) {
    c.set("num_layers", int64_t{4});
    c.set("rope_dims", int64_t{4});
    c.set("xsa_last_n", int64_t{2});
    c.set("bigram_vocab_size", int64_t{31});
    c.set("bigram_dim", int64_t{8});
    c.set("trigram_hash", trigram);
  }
  if (stack == "s600") c.set("bigram_direct_size", int64_t{50});
  if (stack == "s1560") {
    // 5 physical layers, layers 1-2 looped twice: plan [0,1,2 | 1,2,3,4] (7 virtual), parallel lanes
    // from layer 3, skip gates, XSA everywhere.
    c.set("num_layers", int64_t{5});
    c.set("rope_dims", int64_t{4});
    c.set("xsa_last_n", int64_t{5});
    c.set("num_loops", int64_t{1});
    c.set("loop_start", int64_t{1});
    c.set("loop_end", int64_t{2});
    c.set("parallel_start_layer", int64_t{3});
  }
  return c;
}

inline ModelConfig tiny_config(const std::string& stack) { return ModelConfig::from_config(tiny_preset(stack)); }

// Reference init plus a perturbation (as the golden files do), so that no gradient is identically
// zero: zero-initialised output projections would make every block the identity.
template <typename T>
void perturbed_init(CpuModel<T>& model, uint64_t seed) {
  init_params(model.params(), seed);
  Rng rng(seed ^ 0x5eedull);
  for (size_t i = 0; i < model.params().layout().size(); ++i) {
    const ParamSpec& s = model.params().layout().spec(i);
    const double fan_in = s.shape.empty() ? 1.0 : static_cast<double>(s.shape.back());
    const double sigma = s.shape.size() >= 2 ? 0.5 / std::sqrt(fan_in) : 0.1;
    for (auto& x : model.params()[i]) x += static_cast<T>(rng.normal() * sigma);
  }
}

// B = 2 rows of T = 12 tokens; `packed` cuts the rows into segments mid-row (plus one empty segment,
// as the references pad cu_seqlens).
inline Batch tiny_batch(int vocab, bool packed, uint64_t seed = 7) {
  Batch b;
  b.rows = 2;
  b.seq_len = 12;
  Rng rng(seed);
  for (int64_t i = 0; i < b.tokens(); ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  if (packed) b.cu_seqlens = {0, 5, 12, 20, 24, 24};
  return b;
}

}  // namespace pgolf::test
