// Fitting the artifact under the size cap (config keys artifact_fit, artifact_cap_bytes): when code
// bytes + compressed model bytes exceed the cap, zero the quantized codes of magnitude 1 (±1 → 0, zeros
// compress far better) whose removal changes the dequantized weights least, as few as the real
// compressed size requires.
//
// Cost of zeroing a ±1 code in row r: scale[r]², the squared change of its dequantized value. No
// Hessian weighting: the Hessians exist only for gptq_full and are not in the artifact (pack runs
// without them), and one criterion for every scheme keeps the choice reproducible from the artifact.
// Candidates are ordered by cost, ties by tensor order then element index (stable, deterministic).
//
// Search for the smallest k (the k cheapest candidates zeroed) with model + code <= cap, on the real
// compressed size, to within fit_tolerance(candidates), in rounds of up to kFitProbes serializations run in
// parallel (one thread each: a round costs about one compression, and brotli-11 of a 16 MB model takes tens
// of seconds). Round 1: k = 0 (fits → nothing changes) with a geometric grid n/64, n/32, …, n/2, n (n = all
// candidates; k = all not fitting → error). Across the factor-2 bracket the grid leaves, the size is smooth
// in k but bends (brotli-11 at full size: 0.29 bytes per code over the first 150k codes, 0.31 beyond), so
// each later round is a comb centred on where the parabola through the bracket's ends and the nearest probe
// outside it crosses the budget, its probes half the distance to the secant's crossing apart (at least
// `tolerance`): at full size it straddles the boundary with probes `tolerance` apart, 2 rounds instead of
// the 5 that combs around the secant of (0, all) took. A comb that lands on one side is followed by one
// spanning a quarter of the bracket, then by probes spread evenly over it (as when the bracket is at most
// kFitProbes + 1 tolerances wide, which ends the search). It stops when a fitting and a non-fitting k are
// at most `tolerance` apart and returns the fitting end. Fast compressors do not help aim: brotli-1…9,
// zstd-1/3 and byte-entropy estimates see 3-20x smaller size drops than brotli-11 as k grows and follow its
// curve worse than a line in k does. Probe positions depend only on sizes, not on the number of threads, so
// the result is the same on every machine.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "quant/artifact.h"
#include "quant/pack.h"

namespace pgolf {

enum class ArtifactFit { None, PruneUnitCodes };  // config names: "none", "prune_pm1"
ArtifactFit artifact_fit_from_name(const std::string& name);
const char* artifact_fit_name(ArtifactFit f);

struct FitOptions {
  ArtifactFit mode = ArtifactFit::None;
  int64_t code_bytes = 0;
  int64_t cap_bytes = kArtifactCapBytes;
  int64_t tolerance = 0;  // the search's precision in codes; 0: fit_tolerance(candidates)

  // artifact_fit and artifact_cap_bytes; code bytes are measured by the caller.
  static FitOptions from_config(const Config& c, int64_t code_bytes);
};

struct FitReport {
  ArtifactFit mode = ArtifactFit::None;
  int64_t candidates = 0;          // ±1 codes in the quantized tensors (counted only when pruning is needed)
  int64_t pruned = 0;              // k: codes zeroed
  double pruned_cost = 0.0;        // Σ scale² over the zeroed codes
  int64_t model_bytes_before = 0;  // the artifact file before pruning
  int64_t model_bytes = 0;         // the artifact file written
  int64_t code_bytes = 0, cap_bytes = 0;
  int compressions = 0;            // full serializations the search made
  int rounds = 0;                  // sequential rounds of them (the first is k = 0 and the grid; each runs in parallel)
  int64_t tolerance = 0;           // the search's precision in codes
  int64_t not_fitting = 0;         // the largest k seen not to fit: pruned - not_fitting <= tolerance
  bool under_cap() const { return model_bytes + code_bytes <= cap_bytes; }
  // {"mode", "candidates", "pruned", "pruned_cost", "model_bytes_before", "compressions"} for results.
  nlohmann::ordered_json to_json() const;
};

// Probes per search round.
constexpr int kFitProbes = 8;

// The search's precision in codes: 1 (the exact smallest k) up to 16,384 candidates, then 1/16,384 of
// them (about 600 codes of a full-size s1560 model's ~10 M): bounds the rounds to a few.
inline int64_t fit_tolerance(int64_t candidates) { return candidates <= 16384 ? 1 : candidates / 16384; }

struct FittedArtifact {
  std::vector<uint8_t> file;  // serialize_artifact of the (pruned) artifact
  ArtifactSizes sizes;
  FitReport report;
};

// Serializes `a`, pruning its ±1 codes first if asked and needed (a.model is updated in place to what
// the file holds). With mode None the artifact is serialized as it is, whatever its size. Throws when
// even zeroing every ±1 code leaves the total above the cap.
FittedArtifact fit_artifact(Artifact& a, const FitOptions& options);

// One ±1 code that may be zeroed: its tensor (index in QuantizedModel::tensors), element and cost.
struct PruneCandidate {
  int32_t tensor = 0;
  int64_t index = 0;
  double cost = 0.0;
};
// Every ±1 code of the quantized tensors, cheapest first (ties: tensor order, then index).
std::vector<PruneCandidate> unit_code_candidates(const QuantizedModel& m);

}  // namespace pgolf
