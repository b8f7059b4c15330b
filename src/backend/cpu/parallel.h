// How the CPU ops use threads: one OpenMP pool for everything (OpenBLAS runs single-threaded and
// gemm() splits large products across the pool), and small ops stay on the calling thread.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// An OpenMP region costs microseconds, and far more when other processes hold the cores (a thread
// spins at the barrier while its sibling is descheduled): below this much work an op runs serially.
inline constexpr int64_t kParallelMinWork = int64_t{1} << 15;  // elements (or multiply-adds / 8)

inline bool parallel_worth(int64_t work) { return work >= kParallelMinWork; }

// Sets the threading policy once per process (idempotent): OpenBLAS single-threaded, and OpenMP's
// dynamic team size, which shrinks teams when the machine is loaded (libgomp subtracts the load
// average from the core count) instead of spinning threads that cannot run. Measured on 2 shared
// cores under load ~7: 20 s with fixed teams vs 2 s with dynamic teams for the same golden tests.
void configure_cpu_threads();

}  // namespace pgolf::cpu
