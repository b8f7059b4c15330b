#include "backend/cpu/gemm.h"

#include <algorithm>
#include <cblas.h>
#include <omp.h>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

namespace {

CBLAS_TRANSPOSE op(bool t) { return t ? CblasTrans : CblasNoTrans; }

void blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, op(ta), op(tb), static_cast<blasint>(M), static_cast<blasint>(N),
              static_cast<blasint>(K), alpha, A, static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
              static_cast<blasint>(ldc));
}

void blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, op(ta), op(tb), static_cast<blasint>(M), static_cast<blasint>(N),
              static_cast<blasint>(K), alpha, A, static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
              static_cast<blasint>(ldc));
}

// Panels of one product: at most kGemmPanels, each at least kGemmMinPanel rows (or columns).
constexpr int64_t kGemmPanels = 8;
constexpr int64_t kGemmMinPanel = 32;

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  configure_cpu_threads();
  // Inside any parallel region (active or not: omp_get_level counts both) the caller owns the
  // threads and the product runs whole; the choice depends on the call site, never the team size.
  if (omp_get_level() > 0 || !parallel_worth(M * N * K / 8)) {
    blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // Split the larger output dimension into panels whose count and bounds depend on the shape only,
  // never on the number of threads, so every result is bit-identical whatever the team size: rows of
  // C take rows of op(A), columns of C take columns of op(B).
  const bool split_rows = M >= N;
  const int64_t extent = split_rows ? M : N;
  const int64_t panels = std::min<int64_t>(kGemmPanels, (extent + kGemmMinPanel - 1) / kGemmMinPanel);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < panels; ++t) {
    const int64_t b = extent * t / panels, e = extent * (t + 1) / panels;
    if (split_rows) {
      const T* a = trans_a ? A + b : A + b * lda;
      blas(trans_a, trans_b, e - b, N, K, alpha, a, lda, B, ldb, beta, C + b * ldc, ldc);
    } else {
      const T* bb = trans_b ? B + b * ldb : B + b;
      blas(trans_a, trans_b, M, e - b, K, alpha, A, lda, bb, ldb, beta, C + b, ldc);
    }
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

}  // namespace pgolf::cpu
