#include "quant/fit.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <map>

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

// Where the parabola through three measured (k, size) points crosses `budget` in [lo, hi], where it is
// above the budget at lo and within it at hi (two of the points): bisection on the parabola.
double parabola_crossing(const std::array<std::pair<double, double>, 3>& points, double lo, double hi, double budget) {
  const auto size_at = [&](double k) {  // Lagrange form
    double size = 0.0;
    for (int i = 0; i < 3; ++i) {
      double term = points[i].second;
      for (int j = 0; j < 3; ++j) {
        if (j != i) term *= (k - points[j].first) / (points[i].first - points[j].first);
      }
      size += term;
    }
    return size;
  };
  for (int it = 0; it < 64; ++it) {
    const double mid = 0.5 * (lo + hi);
    (size_at(mid) > budget ? lo : hi) = mid;
  }
  return hi;
}

// Round 1's probes: k = 0 and a geometric grid k = n / 2^j for j = kFitProbes - 2, ..., 0 (n/64 … n):
// the bracket it leaves spans a factor 2 of k (or [0, n/64]), short enough that the size is close to
// linear in k across it.
std::vector<int64_t> first_round(int64_t n) {
  std::vector<int64_t> ks = {0};
  for (int j = kFitProbes - 2; j >= 0; --j) {
    const int64_t k = n >> j;
    if (k > ks.back()) ks.push_back(k);
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
  const int64_t budget = o.cap_bytes - o.code_bytes;  // model bytes allowed
  if (o.mode == ArtifactFit::None) {
    out.file = serialize_artifact(a, &out.sizes);
    r.compressions = 1;
    r.rounds = 1;
    r.model_bytes_before = r.model_bytes = static_cast<int64_t>(out.file.size());
    return out;
  }

  // Round 1: k = 0 and the grid in parallel (the grid costs no extra wall time with kFitProbes cores).
  const std::vector<PruneCandidate> cands = unit_code_candidates(a.model);
  const int64_t n = static_cast<int64_t>(cands.size());
  QuantizedModel original = std::move(a.model);
  a.model = QuantizedModel{};  // `a` without its model is what every trial copies
  std::vector<Trial> grid = run_trials(a, original, cands, first_round(n));
  r.compressions = static_cast<int>(grid.size());
  r.rounds = 1;
  r.model_bytes_before = r.model_bytes = static_cast<int64_t>(grid[0].file.size());
  if (r.model_bytes <= budget) {
    a.model = std::move(original);
    out.file = std::move(grid[0].file);
    out.sizes = grid[0].sizes;
    return out;
  }
  r.candidates = n;
  r.tolerance = o.tolerance > 0 ? o.tolerance : fit_tolerance(n);
  const int64_t size_all = static_cast<int64_t>(grid.back().file.size());
  PG_CHECK(n > 0 && size_all <= budget,
           "artifact_fit = prune_pm1 cannot fit preset {}: with all {} codes of magnitude 1 zeroed the model takes {} "
           "bytes + {} code bytes = {}, over the artifact_cap_bytes {} by {} (unpruned: {} model bytes)",
           a.preset, n, size_all, o.code_bytes, size_all + o.code_bytes, o.cap_bytes,
           size_all + o.code_bytes - o.cap_bytes, r.model_bytes_before);

  // Invariant: k = lo does not fit (size_lo > budget), k = hi fits (out holds its file).
  int64_t lo = 0, size_lo = r.model_bytes, hi = n + 1, size_hi = 0;  // hi = n + 1 until the grid's k = n
  std::map<int64_t, int64_t> measured;  // every probe's size, by k
  // The smallest fitting trial becomes hi, then the largest non-fitting one below it lo; true when both
  // ends moved (the trials straddle the boundary).
  const auto narrow = [&](std::vector<Trial>& trials) {
    const int64_t old_lo = lo, old_hi = hi;
    for (Trial& t : trials) {
      measured[t.k] = static_cast<int64_t>(t.file.size());
      if (static_cast<int64_t>(t.file.size()) <= budget && t.k < hi) {
        hi = t.k;
        size_hi = static_cast<int64_t>(t.file.size());
        out.file = std::move(t.file);
        out.sizes = t.sizes;
      }
    }
    for (const auto& [k, size] : measured) {
      if (size > budget && k > lo && k < hi) {
        lo = k;
        size_lo = size;
      }
    }
    return lo != old_lo && hi != old_hi;
  };
  narrow(grid);

  int one_sided_rounds = 0;  // consecutive combs whose probes all fell on one side of the boundary
  while (hi - lo > r.tolerance) {
    // Two predictions of the boundary: the secant between the bracket's ends, and the parabola through them
    // and the measured k nearest outside (the size bends as k grows). The comb is centred on the parabola's,
    // its probes half their distance apart (at least `tolerance`), so it spans twice that distance on either
    // side.
    const double frac = static_cast<double>(size_lo - budget) / static_cast<double>(size_lo - size_hi);
    const double secant_k = static_cast<double>(lo) + frac * static_cast<double>(hi - lo);
    double predicted = secant_k;
    const auto at_lo = measured.find(lo), after_hi = std::next(measured.find(hi));
    const bool has_below = at_lo != measured.begin(), has_above = after_hi != measured.end();
    if (has_below || has_above) {
      const auto below = has_below ? std::prev(at_lo) : after_hi;
      const auto outside = !has_above || (has_below && lo - below->first <= after_hi->first - hi) ? below : after_hi;
      predicted = parabola_crossing({{{double(lo), double(size_lo)}, {double(hi), double(size_hi)},
                                      {double(outside->first), double(outside->second)}}},
                                    double(lo), double(hi), double(budget));
    }
    const int64_t target = static_cast<int64_t>(std::ceil(predicted));
    int64_t spacing = std::max(r.tolerance, static_cast<int64_t>(std::ceil(std::abs(predicted - secant_k) / 2)));
    // After a comb that landed on one side, it spans at least a quarter of (lo, hi) (it straddles the
    // boundary when the aim is off by less than an eighth of the gap); the probes spread evenly over
    // (lo, hi) after two such combs, or when that ends the search (a gap of at most kFitProbes + 1
    // tolerances) or a comb would cover the gap anyway.
    if (one_sided_rounds == 1) spacing = std::max(spacing, (hi - lo) / (4 * kFitProbes));
    const bool spread = one_sided_rounds >= 2 || hi - lo <= (kFitProbes + 1) * r.tolerance ||
                        kFitProbes * spacing >= hi - lo;
    std::vector<Trial> trials = run_trials(a, original, cands, probes(lo, hi, !spread, target, spacing));
    r.compressions += static_cast<int>(trials.size());
    ++r.rounds;
    one_sided_rounds = narrow(trials) ? 0 : one_sided_rounds + 1;
  }
  a.model = with_pruned(original, cands, hi);
  r.pruned = hi;
  r.not_fitting = lo;
  r.model_bytes = size_hi;
  for (int64_t i = 0; i < hi; ++i) r.pruned_cost += cands[i].cost;
  return out;
}

}  // namespace pgolf
