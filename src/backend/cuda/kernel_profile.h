// Per-kernel GPU times through CUPTI's activity records (loaded at run time, so the benchmark runs
// where CUPTI is missing and just says so): every kernel launched between start() and stop() is
// recorded with its device start and end time, and summed by (shortened, demangled) name. Copies and
// memsets are recorded too, for the idle time: the stretches where the device runs none of them.
#pragma once

#include <string>
#include <vector>

namespace pgolf::cuda {

struct KernelTime {
  std::string name;
  double total_ms = 0.0;
  long calls = 0;
};

// Device idle time between two pieces of work (the one that ended last before it and the one that
// starts it), summed over every occurrence of that pair.
struct IdleGap {
  std::string before, after;
  double total_ms = 0.0, max_us = 0.0;
  long count = 0;
};

struct IdleSummary {
  double total_ms = 0.0;      // time between the first start and the last end with nothing running
  long gaps = 0;              // how many stretches
  std::vector<IdleGap> pairs;  // by pair, largest total first
  std::vector<IdleGap> categories;  // the same by the pair's kernel_category, largest total first
};

// The kind of work a kernel does, from its name: "gemm" (cuBLAS/cuBLASLt and the Newton–Schulz
// products), "attention" (the flash kernels and their prepare/finish passes) or "other" (row,
// elementwise, loss, optimizer and copy kernels); "copy" for the memcpy and memset records.
const char* kernel_category(const std::string& name);

class KernelProfile {
 public:
  // False (with why()) when libcupti cannot be loaded or refuses to trace.
  bool start();
  // Flushes the records; kernel times sorted by total, largest first.
  std::vector<KernelTime> stop();
  const std::string& why() const { return why_; }
  // The idle stretches of the records that stop() flushed.
  const IdleSummary& idle() const { return idle_; }

 private:
  std::string why_;
  IdleSummary idle_;
};

}  // namespace pgolf::cuda
