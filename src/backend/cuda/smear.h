// SmearGate v1 on the device (twin of cpu/smear.h): y_t = (1−g)⊙x_t + g⊙x_{t−1}, g = σ(gate) [dim],
// x_{−1} = 0 at position 0 of every batch row. Token rows of `dim` features (multiple of 8, ≤ 1024).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {

// x, y [rows·seq_len, dim] bf16 (must not alias).
void smear_forward(const __nv_bfloat16* x, const float* gate, __nv_bfloat16* y, int64_t rows, int64_t seq_len, int dim,
                   cudaStream_t stream);

// dx (fp32) += (1−g)⊙dy_t + g⊙dy_{t+1} (within the row); dgate += g(1−g)⊙Σ_t dy_t⊙(x_{t−1} − x_t)
// (null: skipped). dy fp32. accumulate false: dx is not read (0 + the same sum, as on a cleared dx).
void smear_backward(const float* dy, const __nv_bfloat16* x, const float* gate, float* dx, float* dgate, int64_t rows,
                    int64_t seq_len, int dim, const ReduceWorkspace& ws, cudaStream_t stream, bool accumulate = true);

}  // namespace pgolf::cuda
