// The evaluation modes of `pgolf eval` and `eval_modes`, by name, with their options from the
// configuration.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"
#include "eval/ledger.h"
#include "eval/result.h"

namespace pgolf {

class Communicator;
class Engine;

// flat, sliding, ttt-sgd, ttt-adamw, ttt-lora, ttt-phased.
const std::vector<std::string>& eval_mode_names();
// Throws naming the known modes when `mode` is not one of them.
void check_eval_mode(const std::string& mode);
// TTT modes change the engine's weights: reload them before the next mode.
bool eval_mode_trains(const std::string& mode);

struct EvalInputs {
  std::span<const uint16_t> tokens;  // the validation stream (SPEC §2.5)
  const ByteTables* tables = nullptr;
  int bos_id = 1;
  int64_t seq_len = 0;  // T_eval
};

// Runs one mode (a collective: every rank calls it).
EvalOutcome run_eval_mode(const std::string& mode, Engine& engine, Communicator& comm, const Config& config,
                          const EvalInputs& inputs, ScoreObserver* observer = nullptr);

}  // namespace pgolf
