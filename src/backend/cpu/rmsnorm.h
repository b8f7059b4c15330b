// RMSNorm without a weight, as F.rms_norm(x, (dim,), eps=None) in the references:
// y = x / sqrt(mean(x²) + eps) · scale over each row of `dim` values. eps is the fp32 machine epsilon
// 2⁻²³ in fp32 and in fp64 mode alike (the references run in fp32; SPEC §3.3, golden README).
// `scale` folds the LN-scale factor 1/sqrt(layer+1) into the op. The same op serves the per-head
// QK-norm (rows = tokens·heads, dim = head_dim).
#pragma once

#include <cstdint>

namespace pgolf::cpu {

inline constexpr double kRmsNormEps = 1.1920928955078125e-07;  // 2^-23 = torch.finfo(float32).eps

// y[rows,dim] from x; rstd[rows] = 1/sqrt(mean(x²)+eps) is saved for the backward. y may alias x.
template <typename T>
void rmsnorm_forward(const T* x, T* y, T* rstd, int64_t rows, int64_t dim, T scale = T(1));

// dx[rows,dim] += d(y)/d(x)ᵀ dy, using the saved input x and rstd.
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* rstd, T* dx, int64_t rows, int64_t dim, T scale = T(1));

}  // namespace pgolf::cpu
