#include "backend/cuda/step_graphs.h"

#include "backend/cuda/check.h"

#include <chrono>

namespace pgolf::cuda {

void StepGraphs::run(const std::string& key, cudaStream_t stream, const std::function<void()>& enqueue) {
  Entry& e = entries_[key];
  if (!enabled_ || ++e.calls < capture_at_) {
    enqueue();
    ++stats_.eager;
    return;
  }
  if (!e.exec) {
    const auto t0 = std::chrono::steady_clock::now();
    cudaGraph_t graph = nullptr;
    // Thread-local capture: other threads (a data loader) may still allocate and copy meanwhile.
    PG_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      enqueue();
    } catch (...) {
      cudaStreamEndCapture(stream, &graph);  // leave the stream usable before the error propagates
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    PG_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    const cudaError_t instantiated = cudaGraphInstantiate(&e.exec, graph, 0);
    cudaGraphDestroy(graph);
    PG_CUDA_CHECK(instantiated);
    stats_.capture_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++stats_.captured;
  } else {
    ++stats_.replayed;
  }
  PG_CUDA_CHECK(cudaGraphLaunch(e.exec, stream));
}

void StepGraphs::clear() {
  for (auto& [key, e] : entries_)
    if (e.exec) cudaGraphExecDestroy(e.exec);
  entries_.clear();
}

size_t StepGraphs::captured() const {
  size_t n = 0;
  for (const auto& [key, e] : entries_) n += e.exec ? 1 : 0;
  return n;
}

}  // namespace pgolf::cuda
