#include "quant/prune.h"

#include <cmath>

#include "quant/quantile.h"

namespace pgolf {

PruneRecord prune_magnitudes(std::span<float> w, float frac) {
  PruneRecord rec;
  rec.numel = static_cast<int64_t>(w.size());
  if (w.empty()) return rec;
  rec.threshold = quantile_sorted(sorted_abs(w), frac);
  for (float& x : w)
    if (std::fabs(x) < rec.threshold) {
      x = 0.0f;
      ++rec.zeroed;
    }
  return rec;
}

std::vector<PruneRecord> prune_state(TensorMap& weights, float frac, int64_t min_numel) {
  std::vector<PruneRecord> out;
  for (const auto& name : weights.names()) {
    HostTensor& t = weights.get(name);
    if (t.shape.size() != 2 || t.numel() <= min_numel) continue;
    PG_CHECK(t.dtype == DType::F32, "pruning '{}': expected an F32 tensor, got {}", name, dtype_name(t.dtype));
    PruneRecord rec = prune_magnitudes(t.as<float>(), frac);
    rec.name = name;
    out.push_back(std::move(rec));
  }
  return out;
}

}  // namespace pgolf
