#include "backend/cuda/launch.cuh"

#include <atomic>

namespace pgolf::cuda {
namespace {
std::atomic<bool>& programmatic() {
  static std::atomic<bool> on{true};
  return on;
}
}  // namespace

void set_programmatic_launch(bool on) { programmatic().store(on); }
bool programmatic_launch() { return programmatic().load(); }

}  // namespace pgolf::cuda
