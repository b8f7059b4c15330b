// Soft-capped logits and cross-entropy on the device (twin of cpu/softcap_ce.h): c = cap·tanh(z/cap),
// loss_i = logsumexp(c_i) − c_i[target_i], all in fp32 from the bf16 raw logits z [N, V] of the head
// GEMM. The capped logits are never stored: the forward reads z once, the backward reads it again and
// overwrites it with dz (or the forward writes dz itself when the weights are known), so no fp32 [N, V]
// tensor exists.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

// What a forward that also forms the backward's dz needs (softcap_ce_forward's `grad`): dz [N, V] bf16
// (may alias z), and the weights of softcap_ce_backward (weights [N], or uniform_weight when null).
struct CeGradient {
  __nv_bfloat16* dz = nullptr;
  const float* weights = nullptr;
  float uniform_weight = 0.f;
};

// losses [N] and lse [N] (fp32). V a multiple of 8; every target in [0, V) (checked on the host). With
// `grad`, also dz as softcap_ce_backward writes it from this lse (the same bits): rows of up to 32,768
// logits in the same pass over z, longer rows by the backward after it.
void softcap_ce_forward(const __nv_bfloat16* z, const int32_t* targets, float* losses, float* lse, int64_t N, int V,
                        float cap, cudaStream_t stream, const CeGradient* grad = nullptr);

// Gradient of Σ_i w_i·loss_i with respect to z: dz = w_i·(softmax(c_i) − onehot)·(1 − (c/cap)²), bf16,
// written (may alias z). w = weights[i] (device, fp32 [N]) or, when weights is null, uniform_weight.
void softcap_ce_backward(const __nv_bfloat16* z, const float* lse, const int32_t* targets, const float* weights,
                         float uniform_weight, __nv_bfloat16* dz, int64_t N, int V, float cap, cudaStream_t stream);

// out[0] = Σ losses / n, summed in a fixed order by one block.
void mean_loss(const float* losses, int64_t n, float* out, cudaStream_t stream);

// The losses of selected positions put in their places: out[j] = NaN for j < n (not computed), then
// out[index[i]] = values[i] for i < rows (index in [0, n), device int32).
void scatter_losses(const float* values, const int32_t* index, int64_t rows, float* out, int64_t n,
                    cudaStream_t stream);

}  // namespace pgolf::cuda
