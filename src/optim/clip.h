// Gradient clipping by the global L2 norm (SPEC §4.5), as torch.nn.utils.clip_grad_norm_ does it.
// Which gradients it sees (rank-averaged or local) is the caller's choice (`grad_clip_local`).
#pragma once

#include <span>

namespace pgolf::optim {

// L2 norm of all values, accumulated in fp64 over fixed chunks then summed in chunk order, so the
// result does not depend on the number of threads.
double global_l2_norm(std::span<const float> values);

// min(1, max_norm / (total_norm + 1e-6)) in fp32, computed as PyTorch does
// (`max_norm / (norm + 1e-6)` = reciprocal then multiply, clamped at 1).
float clip_coefficient(double total_norm, double max_norm);

// Multiplies `grads` by the clip coefficient (when max_norm > 0) and returns the norm before clipping.
double clip_grad_norm(std::span<float> grads, double max_norm);

}  // namespace pgolf::optim
