// The MLP activation on the device (twin of cpu/activation.h): post = leaky(pre)², leaky(x) = x for
// x > 0 and slope·x otherwise (relu² at slope 0). bf16 [n], n a multiple of 8.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

void leaky_relu_sq_forward(const __nv_bfloat16* pre, __nv_bfloat16* post, int64_t n, float slope, cudaStream_t stream);

// dpre = dpost · f'(pre), f'(x) = 2x (x > 0) or 2·slope²·x: written (not accumulated); may alias dpost.
void leaky_relu_sq_backward(const __nv_bfloat16* dpost, const __nv_bfloat16* pre, __nv_bfloat16* dpre, int64_t n,
                            float slope, cudaStream_t stream);

}  // namespace pgolf::cuda
