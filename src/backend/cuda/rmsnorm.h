// RMSNorm on the device (twin of cpu/rmsnorm.h): y = x / sqrt(mean(x²) + 2⁻²³) · scale over rows of
// `dim` features, bf16 in and out, fp32 statistics. The input may be the mean of two tensors
// (s1560's final lane average, 0.5·(x + x2)), formed in fp32 without being stored.
// dim must be a multiple of 8 and at most 1024; rows are 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/norm_grad.h"

namespace pgolf::cuda {

// y [rows, dim] bf16, rstd [rows] = 1/sqrt(mean(u²) + eps) with u = x, or 0.5·(x + x2) when x2 is given.
void rmsnorm_forward(const __nv_bfloat16* x, const __nv_bfloat16* x2, __nv_bfloat16* y, float* rstd, int64_t rows,
                     int dim, float scale, cudaStream_t stream);

// dx (fp32) = (accumulate ? dx : 0) + out_scale · scale·rstd·(dy − u·rstd²·(dy·u)/dim), u as in the
// forward (out_scale = 0.5 gives each lane's share of the mean's gradient). dy: fp32 or bf16 rows.
void rmsnorm_backward(NormGrad dy, const __nv_bfloat16* x, const __nv_bfloat16* x2, const float* rstd, float* dx,
                      int64_t rows, int dim, float scale, float out_scale, bool accumulate, cudaStream_t stream);

}  // namespace pgolf::cuda
