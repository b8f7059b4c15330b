// Row-major GEMM on the CPU through OpenBLAS (cblas_sgemm / cblas_dgemm): the one place where the
// CPU backend multiplies matrices.
//
// Threading: OpenBLAS runs single-threaded and large products are split into panels across the
// OpenMP threads here, so one thread pool serves every CPU op (parallel.h). The panels depend on the
// shape only, so results are bit-identical for any number of threads. OpenBLAS's own pthread
// pool and the OpenMP pool both spin while idle; alternating between them made the model ~15x slower
// on 2 cores.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// C[M,N] = alpha * op(A) op(B) + beta * C, all row-major; op(X) = Xᵀ when the flag is set.
// A is [M,K] (or [K,M] transposed), B is [K,N] (or [N,K] transposed); ld* are row strides.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace pgolf::cpu
