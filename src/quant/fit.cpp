#include "quant/fit.h"

#include <algorithm>
#include <cmath>

#include "quant/rowwise.h"

namespace pgolf {

ArtifactFit artifact_fit_from_name(const std::string& name) {
  if (name == "none") return ArtifactFit::None;
  if (name == "prune_pm1") return ArtifactFit::PruneUnitCodes;
  fail("artifact_fit = '{}': expected none | prune_pm1", name);
}

const char* artifact_fit_name(ArtifactFit f) { return f == ArtifactFit::None ? "none" : "prune_pm1"; }

FitOptions FitOptions::from_config(const Config& c, int64_t code_bytes) {
  FitOptions o;
  o.mode = artifact_fit_from_name(c.get_string("artifact_fit"));
  o.code_bytes = code_bytes;
  o.cap_bytes = c.get_int("artifact_cap_bytes");
  PG_CHECK(o.cap_bytes > 0, "artifact_cap_bytes = {}: expected a positive byte count", o.cap_bytes);
  return o;
}

nlohmann::ordered_json FitReport::to_json() const {
  return {{"mode", artifact_fit_name(mode)},   {"candidates", candidates},
          {"pruned", pruned},                  {"pruned_cost", pruned_cost},
          {"model_bytes_before", model_bytes_before}, {"compressions", compressions}};
}

std::vector<PruneCandidate> unit_code_candidates(const QuantizedModel& m) {
  std::vector<PruneCandidate> out;
  for (size_t ti = 0; ti < m.tensors.size(); ++ti) {
    const QuantizedTensor& t = m.tensors[ti];
    if (t.plan.method == QuantMethod::Passthrough) continue;
    const std::vector<float> scales = scale_values(t.scale);  // [rows], one value for a scalar scale
    const int64_t rows = static_cast<int64_t>(scales.size());
    const int64_t cols = static_cast<int64_t>(t.codes.size()) / rows;
    for (int64_t i = 0; i < static_cast<int64_t>(t.codes.size()); ++i) {
      if (t.codes[i] != 1 && t.codes[i] != -1) continue;
      const double s = scales[i / cols];
      out.push_back({static_cast<int32_t>(ti), i, s * s});
    }
  }
  std::sort(out.begin(), out.end(), [](const PruneCandidate& a, const PruneCandidate& b) {
    if (a.cost != b.cost) return a.cost < b.cost;
    if (a.tensor != b.tensor) return a.tensor < b.tensor;
    return a.index < b.index;
  });
  return out;
}

namespace {

// `original` with its k cheapest candidates zeroed.
QuantizedModel with_pruned(const QuantizedModel& original, const std::vector<PruneCandidate>& cands, int64_t k) {
  QuantizedModel m = original;
  for (int64_t i = 0; i < k; ++i) m.tensors[cands[i].tensor].codes[cands[i].index] = 0;
  return m;
}

}  // namespace

FittedArtifact fit_artifact(Artifact& a, const FitOptions& o) {
  FittedArtifact out;
  FitReport& r = out.report;
  r.mode = o.mode;
  r.code_bytes = o.code_bytes;
  r.cap_bytes = o.cap_bytes;
  out.file = serialize_artifact(a, &out.sizes);
  r.compressions = 1;
  r.model_bytes_before = r.model_bytes = static_cast<int64_t>(out.file.size());
  const int64_t budget = o.cap_bytes - o.code_bytes;  // model bytes allowed
  if (o.mode == ArtifactFit::None || r.model_bytes <= budget) return out;

  const std::vector<PruneCandidate> cands = unit_code_candidates(a.model);
  const int64_t n = static_cast<int64_t>(cands.size());
  r.candidates = n;
  const QuantizedModel original = std::move(a.model);
  // Invariant: k = lo does not fit (size_lo > budget), k = hi fits (out holds its file).
  int64_t lo = 0, hi = n, size_lo = r.model_bytes;
  a.model = with_pruned(original, cands, n);
  out.file = serialize_artifact(a, &out.sizes);
  ++r.compressions;
  int64_t size_hi = static_cast<int64_t>(out.file.size());
  PG_CHECK(size_hi <= budget,
           "artifact_fit = prune_pm1 cannot fit preset {}: with all {} codes of magnitude 1 zeroed the model takes {} "
           "bytes + {} code bytes = {}, over the artifact_cap_bytes {} by {} (unpruned: {} model bytes)",
           a.preset, n, size_hi, o.code_bytes, size_hi + o.code_bytes, o.cap_bytes, size_hi + o.code_bytes - o.cap_bytes,
           r.model_bytes_before);

  int same_end_moves = 0;
  bool last_moved_hi = false;
  while (hi - lo > 1) {
    int64_t k;
    if (same_end_moves >= 2) {
      k = lo + (hi - lo) / 2;  // the secant keeps landing on one side: bisect
    } else {
      // size is about linear in k between the ends: aim at the budget (size_lo > budget >= size_hi).
      const double frac = static_cast<double>(size_lo - budget) / static_cast<double>(size_lo - size_hi);
      k = lo + static_cast<int64_t>(std::ceil(frac * static_cast<double>(hi - lo)));
      k = std::clamp(k, lo + 1, hi - 1);
    }
    a.model = with_pruned(original, cands, k);
    ArtifactSizes sizes;
    std::vector<uint8_t> file = serialize_artifact(a, &sizes);
    ++r.compressions;
    const int64_t size = static_cast<int64_t>(file.size());
    const bool moved_hi = size <= budget;
    same_end_moves = (r.compressions > 3 && moved_hi == last_moved_hi) ? same_end_moves + 1 : 1;
    last_moved_hi = moved_hi;
    if (moved_hi) {
      hi = k;
      size_hi = size;
      out.file = std::move(file);
      out.sizes = sizes;
    } else {
      lo = k;
      size_lo = size;
    }
  }
  a.model = with_pruned(original, cands, hi);
  r.pruned = hi;
  r.model_bytes = size_hi;
  for (int64_t i = 0; i < hi; ++i) r.pruned_cost += cands[i].cost;
  return out;
}

}  // namespace pgolf
