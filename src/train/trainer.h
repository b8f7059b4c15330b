// The training loop (SPEC §4, §4.11): seed → validation data and byte tables → initial weights →
// the preset's loader → timed steps with the schedules (lr warmdown on training time with the
// validation pauses excluded, Muon momentum warm-up, the s1560 loop switch, the late-QAT latch),
// EMA / SWA, periodic flat validation, the wall-clock cap and the step limit → final validation of
// the live weights → the EMA (or SWA) applied and validated again. Checkpoints make a run resumable
// with a bit-identical loss curve when the schedule does not depend on time
// (max_wallclock_seconds = 0); a wall-clock-capped run resumes with the training time saved in the
// checkpoint, so its schedule continues where it stopped but its later steps depend on timing.
//
// The trainer talks only to an Engine and the Communicator: one call per rank, rank 0 writes files.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/fs.h"
#include "eval/flat.h"
#include "model/params.h"
#include "train/checkpoint.h"

namespace pgolf {

class Communicator;
class Engine;

struct TrainOptions {
  fs::path run_dir;                  // outputs (config.toml, train.log, metrics.jsonl, checkpoints/, final_model); empty = none
  const Checkpoint* resume = nullptr;  // continue from this checkpoint (its config must match, see checkpoint.h)
  bool echo = false;                 // print the log lines on stdout (rank 0)
  bool progress = false;             // live progress line on stderr (rank 0)
  int64_t stop_after_steps = 0;      // > 0: stop right after this step, as if the run were killed there
};

// One optimizer step as logged.
struct StepRecord {
  int64_t step = 0;  // steps completed, 1-based as in the log lines
  double train_loss = 0.0;
  double grad_norm = 0.0;
  double lr_scale = 0.0;
  double muon_momentum = 0.0;
  bool qat = false;
  bool looping = false;
  double train_ms = 0.0;
};

struct ValRecord {
  int64_t step = 0;
  double train_ms = 0.0;
  FlatEvalResult val;
  std::optional<FlatEvalResult> heldout;
};

struct TrainResult {
  std::vector<StepRecord> steps;        // the steps this call ran (after the resume point)
  std::vector<ValRecord> validations;   // periodic and final validations of the live weights
  TrainerState final_state;
  bool stopped_early = false;           // stop_after_steps ended the call before the run's end
  std::string averaging;                // "ema", "swa" or "" (none applied)
  std::optional<ValRecord> averaged;    // validation after the average was applied
  ParamSet<float> final_params;         // the run's output weights (after averaging)
};

// Runs (or resumes) the training of `config` on `engine`; every rank calls it with its engine.
TrainResult train(Engine& engine, Communicator& comm, const Config& config, const TrainOptions& options);

// The run directory of a preset: run_dir with "{preset}" replaced by the preset name.
fs::path resolve_run_dir(const Config& config);

// Path of the checkpoint written after `step` in `run_dir`.
fs::path checkpoint_path(const fs::path& run_dir, int64_t step);

}  // namespace pgolf
