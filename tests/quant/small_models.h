// Small versions of the presets (model_dim 64) with stand-in weights, for artifact and CLI tests.
#pragma once

#include <string>
#include <vector>

#include "core/config.h"
#include "core/rng.h"
#include "quant/banks.h"
#include "quant/gptq.h"
#include "quant/stand_in.h"

namespace pgolf::test {

// The --set assignments that shrink a preset (passthrough threshold scaled like the golden files').
inline std::vector<std::string> small_settings(const std::string& preset) {
  std::vector<std::string> s = {"model_dim=64", "num_heads=4", "num_kv_heads=2", "bigram_dim=16", "ve_dim=16",
                                "prune_min_numel=1024"};
  s.push_back(preset == "s562" ? "passthrough_max_numel=512" : "passthrough_max_numel=1024");
  if (preset == "s1560") s.push_back("vocab_size=512");
  return s;
}

inline Config small_config(const std::string& preset) {
  Config c = Config::load(preset);
  for (const auto& kv : small_settings(preset)) c.set_from_string(kv);
  return c;
}

// Hessians of random correlated inputs for every quantized matrix of `params` (unbanked names).
inline TensorMap random_hessians(const TensorMap& params, int64_t min_numel, uint64_t seed) {
  const TensorMap u = has_banks(params) ? unbank(params) : params;
  HessianSet set;
  Rng rng(seed);
  for (const auto& name : u.names()) {
    const HostTensor& t = u.get(name);
    if (t.shape.size() != 2 || t.numel() <= min_numel) continue;
    const int64_t cols = t.shape[1], rows = 2 * cols;
    std::vector<float> x(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows; ++i) {
      const double common = rng.normal();
      for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = static_cast<float>(common + rng.normal());
    }
    set.add(name, x, rows, cols);
  }
  set.end_batch();
  return set.finalize();
}

}  // namespace pgolf::test
