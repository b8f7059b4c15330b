// StepGraphs: CUDA graphs of the engine's steps, keyed by everything the host bakes into the
// launches (batch shape, mode, accumulation count, EMA on or off). run(key, ...) executes the enqueue
// function eagerly the first times a key is seen (so that lazy initialisation — GEMM plans, kernel
// attributes, RoPE tables — happens outside any capture), captures it at call `capture_at` (the
// second by default) and replays the graph from then on. A capture leaves the GPU idle while the host
// records and instantiates; a key that comes back rarely (LoRA TTT's many batch shapes) costs less
// eagerly, where the host's launches overlap the GPU's work. Replays read the device buffers the enqueue function used, so everything a
// step changes from one call to the next must live in device memory (the batch, the optimizer's
// scalars) and be written before the replay.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <string>

namespace pgolf::cuda {

// What run() did so far: calls run eagerly, captured (with their host seconds: recording and instantiation,
// while the stream runs nothing new) and replayed.
struct StepGraphStats {
  long eager = 0, captured = 0, replayed = 0;
  double capture_seconds = 0.0;
};

class StepGraphs {
 public:
  // capture_at: the call of a key that captures it (the calls before run eagerly); 0: never capture.
  explicit StepGraphs(bool enabled, int capture_at = 2) : enabled_(enabled && capture_at > 0), capture_at_(capture_at) {}
  ~StepGraphs() { clear(); }
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;

  // Runs `enqueue` on `stream` (all its work must go to `stream`) as the graph of `key`.
  void run(const std::string& key, cudaStream_t stream, const std::function<void()>& enqueue);
  // Forgets every graph (after a buffer that a graph reads was reallocated).
  void clear();
  size_t captured() const;  // graphs instantiated so far (and not cleared)
  bool enabled() const { return enabled_; }
  const StepGraphStats& stats() const { return stats_; }

 private:
  struct Entry {
    int calls = 0;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<std::string, Entry> entries_;
  bool enabled_;
  int capture_at_;
  StepGraphStats stats_;
};

}  // namespace pgolf::cuda
