#include "backend/cuda/check.h"
#include "backend/cuda/engine_steps.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

#define PG_GRID_STRIDE(i, n)                                                                       \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void scale_kernel(float* __restrict__ x, int64_t n, float factor) {
  PG_GRID_STRIDE(i, n) x[i] = x[i] * factor;
}

__global__ void clip_scale_kernel(float* __restrict__ x, int64_t n, const GradClipState* __restrict__ clip) {
  const float c = clip->coefficient;
  PG_GRID_STRIDE(i, n) x[i] = x[i] * c;
}

__global__ void accumulate_loss_kernel(const float* __restrict__ loss, double* __restrict__ sum, bool first) {
  *sum = (first ? 0.0 : *sum) + static_cast<double>(*loss);
}

__global__ void write_ttt_scalars_kernel(TttStepScalars* out, const TttStepScalars value) { *out = value; }

__global__ void ttt_sgd_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                               const uint8_t* __restrict__ classes, int64_t n, const TttStepScalars* __restrict__ s,
                               const GradClipState* __restrict__ clip) {
  const float c = clip->coefficient, m = s->momentum;
  const bool first = s->first_step != 0;
  PG_GRID_STRIDE(i, n) {
    const int k = classes[i];
    if (k == 0) continue;
    const float gi = optim::mul_rounded(g[i], c);  // the CPU's clipped gradient, rounded before the add
    const float b = first ? gi : optim::mul_rounded(m, buf[i]) + gi;
    buf[i] = b;
    p[i] -= optim::mul_rounded(s->sgd_lr[k], b);
  }
}

__global__ void ttt_adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, const uint8_t* __restrict__ classes, int64_t n,
                                 const TttStepScalars* __restrict__ s, const GradClipState* __restrict__ clip) {
  const float c = clip->coefficient;
  PG_GRID_STRIDE(i, n) {
    const int k = classes[i];
    if (k == 0) continue;
    float pi = p[i], mi = m[i], vi = v[i];
    optim::adamw_update(pi, optim::mul_rounded(g[i], c), mi, vi, s->adam[k]);
    p[i] = pi, m[i] = mi, v[i] = vi;
  }
}

int blocks(int64_t n) { return item_blocks(n, kThreads, 8192); }

}  // namespace

void scale_f32(float* x, int64_t n, float factor, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<<<blocks(n), kThreads, 0, stream>>>(x, n, factor);
  PG_CUDA_LAUNCH_CHECK();
}

void accumulate_loss(const float* loss, double* sum, bool first, cudaStream_t stream) {
  accumulate_loss_kernel<<<1, 1, 0, stream>>>(loss, sum, first);
  PG_CUDA_LAUNCH_CHECK();
}

void apply_clip(float* x, int64_t n, const GradClipState* clip, cudaStream_t stream) {
  if (n == 0) return;
  clip_scale_kernel<<<blocks(n), kThreads, 0, stream>>>(x, n, clip);
  PG_CUDA_LAUNCH_CHECK();
}

void write_ttt_scalars(TttStepScalars* device, const TttStepScalars& value, cudaStream_t stream) {
  write_ttt_scalars_kernel<<<1, 1, 0, stream>>>(device, value);
  PG_CUDA_LAUNCH_CHECK();
}

void ttt_sgd_step(float* params, const float* grads, float* momentum, const uint8_t* classes, int64_t n,
                  const TttStepScalars* scalars, const GradClipState* clip, cudaStream_t stream) {
  if (n == 0) return;
  ttt_sgd_kernel<<<blocks(n), kThreads, 0, stream>>>(params, grads, momentum, classes, n, scalars, clip);
  PG_CUDA_LAUNCH_CHECK();
}

void ttt_adamw_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, const uint8_t* classes,
                    int64_t n, const TttStepScalars* scalars, const GradClipState* clip, cudaStream_t stream) {
  if (n == 0) return;
  ttt_adamw_kernel<<<blocks(n), kThreads, 0, stream>>>(params, grads, exp_avg, exp_avg_sq, classes, n, scalars, clip);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
