// The outcome of one evaluation mode, as `pgolf eval` reports it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "data/bpb.h"

namespace pgolf {

// The label every output of a mode that trains on validation tokens before scoring them carries.
inline constexpr const char* kNotLegalLabel =
    "NOT LEGAL (non-record: trains on validation tokens before scoring them)";

// One LoRA TTT document batch as this rank ran it: the wall time from its first engine call being
// queued to its last call's losses being collected (the calls overlap the host's work).
struct BatchTiming {
  int64_t index = 0;   // position in the queue
  int64_t docs = 0;    // rows
  int64_t calls = 0;   // engine calls (chunk indices, plus extra steps)
  int64_t tokens = 0;  // positions forwarded: Σ rows · width over the calls
  double seconds = 0.0;
};

struct EvalOutcome {
  std::string mode;            // flat | sliding | ttt-sgd | ttt-adamw | ttt-lora | ttt-phased (+ -pre-eval)
  BpbAccumulator sums;         // over all ranks (fp64)
  int64_t stream_targets = 0;  // targets of the evaluated stream (N)
  int64_t rescored = 0;        // second and later scores of a target (reference sliding tail), all ranks
  double score_seconds = 0.0;  // scoring forwards, this rank (LoRA: with each chunk's first adapter step)
  double train_seconds = 0.0;  // the other TTT training, this rank
  bool legal = true;           // false: trained on validation tokens before scoring them
  bool complete = true;        // false: a wall-clock cap stopped it before every document was scored
  std::string note;            // one line of mode details for the log (rule, stride, chunks, ...)
  std::vector<BatchTiming> batches;  // LoRA modes: this rank's document batches, in the order it ran them

  double val_loss() const { return sums.val_loss(); }
  double val_bpb() const { return sums.val_bpb(); }
  int64_t tokens() const { return static_cast<int64_t>(sums.tokens); }
  int64_t bytes() const { return static_cast<int64_t>(sums.bytes); }
  int64_t unscored() const { return stream_targets - (tokens() - rescored); }
};

using EvalClock = std::chrono::steady_clock;
inline double seconds_since(EvalClock::time_point t0) {
  return std::chrono::duration<double>(EvalClock::now() - t0).count();
}

}  // namespace pgolf
