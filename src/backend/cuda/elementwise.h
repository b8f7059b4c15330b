// Elementwise ops on the device: the scalar-weighted add (twin of cpu::scaled_add_*, used for the
// BigramHash and value-embedding scales) and an fp32 add for gradient streams. n a multiple of 8,
// 16-byte aligned arrays.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {

// y = (accumulate ? y : 0) + s·x over n bf16 values; s is a device scalar.
void scaled_add_forward(const __nv_bfloat16* x, const float* s, __nv_bfloat16* y, int64_t n, bool accumulate,
                        cudaStream_t stream);

// dx = s·dy (bf16, written; null: skipped), ds += Σ dy⊙x (null: skipped); dy fp32.
void scaled_add_backward(const float* dy, const __nv_bfloat16* x, const float* s, __nv_bfloat16* dx, float* ds,
                         int64_t n, const ReduceWorkspace& ws, cudaStream_t stream);

// dst += src (fp32).
void add_f32(float* dst, const float* src, int64_t n, cudaStream_t stream);

// dst = 0 over [n_rows, cols], then dst row index[i] = src row i for i < rows (fp32; index on the device,
// distinct rows in [0, n_rows); cols a multiple of 8).
void scatter_rows_f32(const float* src, const int32_t* index, int64_t rows, int cols, float* dst, int64_t n_rows,
                      cudaStream_t stream);

// Partial-sum rows the elementwise reductions use.
int elementwise_blocks(int64_t n);

}  // namespace pgolf::cuda
