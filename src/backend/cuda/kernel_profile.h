// Per-kernel GPU times through CUPTI's activity records (loaded at run time, so the benchmark runs
// where CUPTI is missing and just says so): every kernel launched between start() and stop() is
// recorded with its device start and end time, and summed by (shortened, demangled) name.
#pragma once

#include <string>
#include <vector>

namespace pgolf::cuda {

struct KernelTime {
  std::string name;
  double total_ms = 0.0;
  long calls = 0;
};

// The kind of work a kernel does, from its name: "gemm" (cuBLAS/cuBLASLt and the Newton–Schulz
// products), "attention" (the flash kernels and their prepare/finish passes) or "other" (row,
// elementwise, loss, optimizer and copy kernels).
const char* kernel_category(const std::string& name);

class KernelProfile {
 public:
  // False (with why()) when libcupti cannot be loaded or refuses to trace.
  bool start();
  // Flushes the records; kernel times sorted by total, largest first.
  std::vector<KernelTime> stop();
  const std::string& why() const { return why_; }

 private:
  std::string why_;
};

}  // namespace pgolf::cuda
