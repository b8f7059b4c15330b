// Weight averaging and the late-QAT quantizer on the device: the twins of optim/averaging.h (EMA)
// and optim/fake_quant.h, with update_math.h's per-element rules (the same bits as the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

// ema[i] ← d·ema[i] + (1 − d)·θ[i] for `count` values (fp32, 16-byte accesses; any alignment of
// `count`, both pointers 16-byte aligned).
void ema_update(float* ema, const float* theta, int64_t count, double decay, cudaStream_t stream);

// The late-QAT forward weight of W [rows, cols] (fp32, row-major): per row s = max(max_j |w| / qmax,
// 1 / qmax), out = bf16(clamp(round(w / s), −qmax − 1, qmax) · s) with qmax = 2^(bits−1) − 1.
// A warp per row; rows of several matrices with the same `cols` can be stacked into one call.
void fake_quantize_rows_bf16(const float* w, int64_t rows, int64_t cols, int bits, __nv_bfloat16* out,
                             cudaStream_t stream);

}  // namespace pgolf::cuda
