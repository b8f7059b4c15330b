// Parameter initialization from the ParamSpec init rules (SPEC §3.11), with our deterministic Rng.
// Bit-equality with PyTorch's generator is not a goal; the distributions and every structural value
// (zeros, ones, constants, orthogonality and its scale, the resid_mix rows) are the references'.
#pragma once

#include <cstdint>

#include "core/rng.h"
#include "model/params.h"

namespace pgolf {

// Fills every tensor; tensor i draws from Rng(seed).fork(i), so a tensor's values do not depend on
// the tensors before it.
template <typename T>
void init_params(ParamSet<T>& params, uint64_t seed);

// out [rows, cols] (row-major) with orthonormal rows (rows ≤ cols) or columns (rows > cols), times
// `gain`: the Q factor of a Gaussian matrix with the signs fixed so that R has a positive diagonal
// (torch.nn.init.orthogonal_). Computed in fp64 by Gram-Schmidt with re-orthogonalization.
void orthogonal_init(double* out, int64_t rows, int64_t cols, double gain, Rng& rng);

}  // namespace pgolf
