#include "backend/cpu/parallel.h"

#include <cblas.h>
#include <omp.h>

namespace pgolf::cpu {

void configure_cpu_threads() {
  static const bool configured = [] {
    openblas_set_num_threads(1);
    omp_set_dynamic(1);
    return true;
  }();
  (void)configured;
}

}  // namespace pgolf::cpu
