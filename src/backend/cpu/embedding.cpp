#include "backend/cpu/embedding.h"

#include <omp.h>

#include "backend/cpu/parallel.h"
#include "core/error.h"

namespace pgolf::cpu {

template <typename T>
void embedding_forward(const int32_t* ids, int64_t N, const T* table, int64_t rows, int64_t dim, T* out,
                       bool accumulate) {
  for (int64_t i = 0; i < N; ++i)
    PG_CHECK(ids[i] >= 0 && ids[i] < rows, "embedding: id {} at position {} is outside the table's {} rows", ids[i],
             i, rows);
#pragma omp parallel for schedule(static) if (parallel_worth(N * dim))
  for (int64_t i = 0; i < N; ++i) {
    const T* src = table + static_cast<int64_t>(ids[i]) * dim;
    T* dst = out + i * dim;
    if (accumulate)
      for (int64_t j = 0; j < dim; ++j) dst[j] += src[j];
    else
      for (int64_t j = 0; j < dim; ++j) dst[j] = src[j];
  }
}

template <typename T>
void embedding_backward(const int32_t* ids, int64_t N, const T* dout, int64_t dim, T* dtable) {
  // Each thread owns a slice of the feature columns of every row, so no two threads write the same
  // element and the summation order per element stays the serial one.
#pragma omp parallel if (parallel_worth(N * dim))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t j0 = dim * t / nt, j1 = dim * (t + 1) / nt;
    for (int64_t i = 0; i < N; ++i) {
      T* dst = dtable + static_cast<int64_t>(ids[i]) * dim;
      const T* src = dout + i * dim;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
}

template void embedding_forward<float>(const int32_t*, int64_t, const float*, int64_t, int64_t, float*, bool);
template void embedding_forward<double>(const int32_t*, int64_t, const double*, int64_t, int64_t, double*, bool);
template void embedding_backward<float>(const int32_t*, int64_t, const float*, int64_t, float*);
template void embedding_backward<double>(const int32_t*, int64_t, const double*, int64_t, double*);

}  // namespace pgolf::cpu
