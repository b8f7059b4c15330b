// Device kernels of CudaEngine's steps besides the model and the training optimizer: gradient
// accumulation scaling, the micro-batch loss sum, local clipping, the score-first TTT optimizers (SGD
// with momentum, AdamW with per-group learning rates and frozen blocks) and the LoRA adapters' Adam.
// Each follows the CPU engine's arithmetic (train/cpu_engine.cpp, optim/update_math.h) so the same
// gradients give the same bits. Pointers are device pointers; everything is stream-ordered and
// capturable (per-step values are read from device structs the host writes before each replay).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/step_scalars.h"
#include "optim/update_math.h"

namespace pgolf::cuda {

// x ← x · factor (fp32; the CPU engine's `g *= 1/n` after n accumulated micro-batches).
void scale_f32(float* x, int64_t n, float factor, cudaStream_t stream);

// *sum ← (first ? 0 : *sum) + (double) *loss: the CPU engine's double sum of micro-batch mean losses.
void accumulate_loss(const float* loss, double* sum, bool first, cudaStream_t stream);

// x ← x · clip->coefficient (local clipping: the gradients are scaled before the rank reduction).
void apply_clip(float* x, int64_t n, const GradClipState* clip, cudaStream_t stream);

// Score-first TTT over the base weights. Every parameter value has a class (uint8, ParamLayout order):
// 0 = frozen (neither the value nor its optimizer state changes), 1..3 = a learning-rate group (base,
// ".proj.", ".fc." for AdamW; SGD uses class 1 for everything that is not frozen).
constexpr int kTttClasses = 4;
struct TttStepScalars {
  float sgd_lr[kTttClasses];                    // float(lr · lr_scale) · multiplier
  optim::AdamCoeffs adam[kTttClasses];          // adam_coeffs(lr · lr_scale · multiplier, ..., step)
  float momentum = 0.9f;
  int first_step = 1;                           // SGD: the momentum buffer starts as the gradient
};
void write_ttt_scalars(TttStepScalars* device, const TttStepScalars& value, cudaStream_t stream);

// torch.optim.SGD(momentum): g ← g·clip; buf ← first ? g : m·buf + g; p ← p − lr·buf.
void ttt_sgd_step(float* params, const float* grads, float* momentum, const uint8_t* classes, int64_t n,
                  const TttStepScalars* scalars, const GradClipState* clip, cudaStream_t stream);
// AdamW (optim::adamw_update) with the class's coefficients on g·clip.
void ttt_adamw_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, const uint8_t* classes,
                    int64_t n, const TttStepScalars* scalars, const GradClipState* clip, cudaStream_t stream);

}  // namespace pgolf::cuda
