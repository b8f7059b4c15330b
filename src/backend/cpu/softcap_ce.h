// Soft-capped logits and cross-entropy (SPEC §3.2): capped = cap·tanh(z/cap), then per token
// loss_i = logsumexp(capped_i) − capped_i[target_i] (F.cross_entropy with reduction "none").
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// z [N, V] raw logits → capped [N, V] (may alias z). When `targets` is given, losses[N] and the
// log-sum-exp lse[N] (kept for the backward) are written; every target must be in [0, V).
template <typename T>
void softcap_ce_forward(const T* z, T* capped, const int32_t* targets, T* losses, T* lse, int64_t N, int64_t V, T cap);

// Gradient of Σ_i dloss_i · loss_i with respect to z: dz = dloss_i · (softmax(capped_i) − onehot) ·
// (1 − (capped/cap)²). dz is written (not accumulated) and may alias capped.
template <typename T>
void softcap_ce_backward(const T* capped, const T* lse, const int32_t* targets, const T* dloss, T* dz, int64_t N,
                         int64_t V, T cap);

}  // namespace pgolf::cpu
