// Training checkpoints: one safetensors file holding everything a run needs to continue exactly —
// the parameters (reference names), the engine's optimizer state (optim/..., EMA ema/...), the SWA
// state (swa/...), and in the metadata the resolved configuration and the trainer's own state
// (step, training time, QAT / looping latches, the data loader's position). Written atomically;
// loading checks the format and, against the configuration of the resuming run, every key that
// shapes the training trajectory.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "core/config.h"
#include "core/fs.h"
#include "core/tensor.h"

namespace pgolf {

// The trainer's state at the end of a step.
struct TrainerState {
  int64_t step = 0;              // optimizer steps completed
  double train_ms = 0.0;         // training time so far (validation and checkpoint pauses excluded)
  bool qat = false;              // late QAT switched on (latched)
  bool looping = false;          // depth recurrence switched on (latched)
  int64_t stop_after_step = -1;  // the wall-clock cap was reached at this step (-1: not yet)
  nlohmann::json loader;         // the training loader's position (data/loaders.h states)
};
void to_json(nlohmann::json& j, const TrainerState& s);
void from_json(const nlohmann::json& j, TrainerState& s);

struct Checkpoint {
  Config config;       // the resolved configuration of the run that wrote it
  TrainerState state;
  TensorMap tensors;   // parameters, optim/..., ema/..., swa/...
};

// Writes `tensors` with the configuration and state in the metadata, atomically.
void save_checkpoint(const fs::path& path, const Config& config, const TrainerState& state, const TensorMap& tensors);
Checkpoint load_checkpoint(const fs::path& path);

// Keys that do not change the training trajectory: data locations, outputs, the logging,
// validation and checkpoint cadence, and everything used only after training (quantization,
// evaluation). Every other key must be equal to resume.
bool resume_may_change(const std::string& key);

// Throws naming every key (with both values) whose change would make the resumed run differ.
void check_resume_config(const Config& saved, const Config& now, const std::string& what);

}  // namespace pgolf
