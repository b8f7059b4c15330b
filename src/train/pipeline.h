// The whole job of a reference script, in its order (SPEC §4.11): train under the wall-clock cap →
// weight averaging → diagnostics → (GPTQ calibration) → quantize and compress → read the artifact
// back → round-trip evaluation → the preset's scoring evaluations (`eval_modes`). One results table
// at the end, written as results.json beside the logs, with PNG plots of the curves.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/fs.h"
#include "model/engine.h"

namespace pgolf {

class Communicator;

using EngineMaker = std::function<std::unique_ptr<Engine>(const Config&, Communicator&)>;

struct PipelineOptions {
  fs::path run_dir;       // outputs; rank 0 writes
  bool echo = true;       // log lines on stdout (rank 0)
  bool progress = false;  // live progress line on stderr
  bool plots = true;      // loss / bpb curves as PNG through gnuplot
};

// Runs the pipeline on every rank (collective); returns the results object (also results.json).
nlohmann::ordered_json run_pipeline(const Config& config, Communicator& comm, const EngineMaker& make_engine,
                            const PipelineOptions& options);

// The results table of run_pipeline's JSON, as printed at the end of a run.
std::string results_table(const nlohmann::ordered_json& results);

// Writes <run_dir>/curves.png (training loss and validation / held-out bpb against the step) from
// metrics.jsonl with gnuplot; throws naming the problem when gnuplot is missing or fails.
void plot_curves(const fs::path& run_dir);

}  // namespace pgolf
