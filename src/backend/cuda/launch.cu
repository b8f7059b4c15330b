#include "backend/cuda/launch.cuh"

#include <atomic>
#include <mutex>
#include <unordered_set>

namespace pgolf::cuda {
namespace {
std::atomic<bool>& programmatic() {
  static std::atomic<bool> on{true};
  return on;
}
std::atomic<int>& carveout() {
  static std::atomic<int> percent{-1};
  return percent;
}
}  // namespace

void set_programmatic_launch(bool on) { programmatic().store(on); }
bool programmatic_launch() { return programmatic().load(); }

void set_row_kernel_carveout(int percent) {
  PG_CUDA_REQUIRE(percent >= -1 && percent <= 100, "cuda_row_carveout must be -1 (the driver's choice) or 0..100");
  carveout().store(percent);
}

void prepare_launch(const void* kernel) {
  const int percent = carveout().load();
  if (percent < 0) return;
  static std::mutex mutex;
  static std::unordered_set<const void*> done;
  std::lock_guard<std::mutex> lock(mutex);
  if (!done.insert(kernel).second) return;
  PG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent));
}

}  // namespace pgolf::cuda
