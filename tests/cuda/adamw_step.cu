#include <cmath>

#include "adamw_step.h"
#include "backend/cuda/check.h"

namespace pgolf::test {
namespace {

__global__ void adamw_kernel(float* p, float* m, float* v, const float* g, int64_t n, AdamW opt, float bc1, float bc2) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = opt.beta1 * m[i] + (1.f - opt.beta1) * gi;
    const float vi = opt.beta2 * v[i] + (1.f - opt.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * (1.f - opt.lr * opt.weight_decay) - opt.lr * (mi / bc1) / (sqrtf(vi / bc2) + opt.eps);
  }
}

}  // namespace

void adamw_step_device(float* p, float* m, float* v, const float* g, int64_t n, const AdamW& opt, int step) {
  const float bc1 = 1.f - std::pow(opt.beta1, static_cast<float>(step));
  const float bc2 = 1.f - std::pow(opt.beta2, static_cast<float>(step));
  adamw_kernel<<<1024, 256>>>(p, m, v, g, n, opt, bc1, bc2);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::test
