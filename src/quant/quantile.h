// torch.quantile's linear interpolation, reproduced bit for bit for fp32 data (SPEC 5.2, golden
// README "Quantizers"): the reference scripts pass q as a Python float, which PyTorch turns into an
// fp32 tensor, so the rank is the fp32 product q * (n - 1) and the interpolation is PyTorch's lerp
// in fp32 (fused multiply-add, as its vectorized CPU and its CUDA kernels compute it).
#pragma once

#include <span>
#include <vector>

namespace pgolf {

// |x| of every element, sorted ascending (the input of every quantile the quantizers take).
std::vector<float> sorted_abs(std::span<const float> x);

// The q-quantile of ascending `sorted` values (q as the fp32 value the reference passes).
float quantile_sorted(std::span<const float> sorted, float q);

// PyTorch's lerp(start, end, weight) for fp32.
float torch_lerp(float start, float end, float weight);

}  // namespace pgolf
