// StepGraphs: CUDA graphs of the engine's steps, keyed by everything the host bakes into the
// launches (batch shape, mode, accumulation count, EMA on or off). run(key, ...) executes the enqueue
// function eagerly the first time a key is seen (so that lazy initialisation — GEMM plans, kernel
// attributes, RoPE tables — happens outside any capture), captures it the second time and replays
// the graph from then on. Replays read the device buffers the enqueue function used, so everything a
// step changes from one call to the next must live in device memory (the batch, the optimizer's
// scalars) and be written before the replay.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <string>

namespace pgolf::cuda {

class StepGraphs {
 public:
  explicit StepGraphs(bool enabled) : enabled_(enabled) {}
  ~StepGraphs() { clear(); }
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;

  // Runs `enqueue` on `stream` (all its work must go to `stream`) as the graph of `key`.
  void run(const std::string& key, cudaStream_t stream, const std::function<void()>& enqueue);
  // Forgets every graph (after a buffer that a graph reads was reallocated).
  void clear();
  size_t captured() const;  // graphs instantiated so far (and not cleared)
  bool enabled() const { return enabled_; }

 private:
  struct Entry {
    int calls = 0;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<std::string, Entry> entries_;
  bool enabled_;
};

}  // namespace pgolf::cuda
