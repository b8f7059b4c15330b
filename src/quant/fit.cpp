#include "quant/fit.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>

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
          {"model_bytes_before", model_bytes_before}, {"compressions", compressions},
          {"rounds", rounds},                  {"tolerance", tolerance},
          {"not_fitting", not_fitting}};
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

struct Trial {
  int64_t k = 0;
  std::vector<uint8_t> file;
  ArtifactSizes sizes;
};

// Serializes the artifact with the k cheapest candidates zeroed, for every k of `ks`, on up to
// kFitProbes OpenMP threads (each compression is single-threaded; a round costs about one compression).
std::vector<Trial> run_trials(const Artifact& base, const QuantizedModel& original,
                              const std::vector<PruneCandidate>& cands, const std::vector<int64_t>& ks) {
  const int n = static_cast<int>(ks.size());
  std::vector<Trial> trials(ks.size());
  std::vector<std::exception_ptr> errors(ks.size());  // exceptions must not leave an OpenMP region
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, std::min({n, kFitProbes, omp_get_num_procs()})))
  for (int i = 0; i < n; ++i) {
    try {
      Artifact copy = base;
      copy.model = with_pruned(original, cands, ks[i]);
      trials[i].k = ks[i];
      trials[i].file = serialize_artifact(copy, &trials[i].sizes);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  }
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return trials;
}

// The probes of one round, strictly inside (lo, hi), ascending and distinct. Aimed: a comb of
// kFitProbes points `spacing` apart centred on `target`; otherwise spread evenly over (lo, hi).
std::vector<int64_t> probes(int64_t lo, int64_t hi, bool aimed, int64_t target, int64_t spacing) {
  std::vector<int64_t> ks;
  for (int j = 0; j < kFitProbes; ++j) {
    int64_t k = aimed ? target + (j - kFitProbes / 2) * spacing
                      : lo + static_cast<int64_t>(std::ceil(static_cast<double>(hi - lo) * (j + 1) / (kFitProbes + 1)));
    k = std::clamp(k, lo + 1, hi - 1);
    if (ks.empty() || k > ks.back()) ks.push_back(k);
  }
  return ks;
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
  r.rounds = 1;
  r.model_bytes_before = r.model_bytes = static_cast<int64_t>(out.file.size());
  const int64_t budget = o.cap_bytes - o.code_bytes;  // model bytes allowed
  if (o.mode == ArtifactFit::None || r.model_bytes <= budget) return out;

  const std::vector<PruneCandidate> cands = unit_code_candidates(a.model);
  const int64_t n = static_cast<int64_t>(cands.size());
  r.candidates = n;
  r.tolerance = o.tolerance > 0 ? o.tolerance : fit_tolerance(n);
  const QuantizedModel original = std::move(a.model);
  a.model = QuantizedModel{};
  // Invariant: k = lo does not fit (size_lo > budget), k = hi fits (out holds its file).
  int64_t lo = 0, hi = n, size_lo = r.model_bytes;
  {
    std::vector<Trial> all = run_trials(a, original, cands, {n});
    ++r.compressions;
    ++r.rounds;
    const int64_t size_hi = static_cast<int64_t>(all[0].file.size());
    PG_CHECK(size_hi <= budget,
             "artifact_fit = prune_pm1 cannot fit preset {}: with all {} codes of magnitude 1 zeroed the model takes {} "
             "bytes + {} code bytes = {}, over the artifact_cap_bytes {} by {} (unpruned: {} model bytes)",
             a.preset, n, size_hi, o.code_bytes, size_hi + o.code_bytes, o.cap_bytes,
             size_hi + o.code_bytes - o.cap_bytes, r.model_bytes_before);
    out.file = std::move(all[0].file);
    out.sizes = all[0].sizes;
  }
  int64_t size_hi = static_cast<int64_t>(out.file.size());

  int one_sided_rounds = 0;  // consecutive rounds whose probes all fell on one side of the boundary
  while (hi - lo > r.tolerance) {
    // size is about linear in k between the ends: aim at the budget (size_lo > budget >= size_hi).
    const double frac = static_cast<double>(size_lo - budget) / static_cast<double>(size_lo - size_hi);
    const int64_t target = lo + static_cast<int64_t>(std::ceil(frac * static_cast<double>(hi - lo)));
    // The comb spans a quarter of (lo, hi): it straddles the boundary when the secant is off by less
    // than an eighth of the gap, and then shrinks it 4 · kFitProbes-fold.
    const int64_t spacing = std::max(r.tolerance, (hi - lo) / (4 * kFitProbes));
    const std::vector<int64_t> ks = probes(lo, hi, one_sided_rounds < 2, target, spacing);
    std::vector<Trial> trials = run_trials(a, original, cands, ks);
    r.compressions += static_cast<int>(trials.size());
    ++r.rounds;
    // The smallest fitting probe becomes hi; the largest non-fitting probe below it becomes lo.
    const int64_t old_lo = lo, old_hi = hi;
    for (Trial& t : trials) {
      if (static_cast<int64_t>(t.file.size()) <= budget && t.k < hi) {
        hi = t.k;
        size_hi = static_cast<int64_t>(t.file.size());
        out.file = std::move(t.file);
        out.sizes = t.sizes;
      }
    }
    for (const Trial& t : trials) {
      if (static_cast<int64_t>(t.file.size()) > budget && t.k > lo && t.k < hi) {
        lo = t.k;
        size_lo = static_cast<int64_t>(t.file.size());
      }
    }
    one_sided_rounds = (lo == old_lo || hi == old_hi) ? one_sided_rounds + 1 : 0;
  }
  a.model = with_pruned(original, cands, hi);
  r.pruned = hi;
  r.not_fitting = lo;
  r.model_bytes = size_hi;
  for (int64_t i = 0; i < hi; ++i) r.pruned_cost += cands[i].cost;
  return out;
}

}  // namespace pgolf
