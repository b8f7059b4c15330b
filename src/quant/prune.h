// Magnitude pruning before quantization (I5/s562, SPEC 5.6): in every 2-D float tensor with more than
// `min_numel` elements, entries with |w| < quantile(|w|, frac) (whole-tensor quantile) become 0.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace pgolf {

struct PruneRecord {
  std::string name;
  float threshold = 0.0f;  // the quantile the reference computes (fp32)
  int64_t zeroed = 0;      // entries set to 0 (entries that were already 0 and below it included)
  int64_t numel = 0;
};

// Prunes one tensor's values in place; returns the threshold and count.
PruneRecord prune_magnitudes(std::span<float> w, float frac);

// Prunes every eligible F32 tensor of `weights` in place (others are left alone), in map order.
std::vector<PruneRecord> prune_state(TensorMap& weights, float frac, int64_t min_numel);

}  // namespace pgolf
