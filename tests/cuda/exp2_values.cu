#include "exp2_values.h"

#include "backend/cuda/arena.h"
#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/check.h"

namespace pgolf::test {
namespace {

__global__ void exp2_values_kernel(const float* x, float* approx, float* poly, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  approx[i] = cuda::attention_detail::exp2_approx(x[i]);
  poly[i] = cuda::attention_detail::exp2_poly(x[i]);
}

}  // namespace

Exp2Values exp2_values_device(const std::vector<float>& x) {
  const int n = static_cast<int>(x.size());
  cuda::DeviceBuffer<float> in(x), approx(x.size()), poly(x.size());
  exp2_values_kernel<<<(n + 255) / 256, 256>>>(in.data(), approx.data(), poly.data(), n);
  PG_CUDA_LAUNCH_CHECK();
  PG_CUDA_CHECK(cudaDeviceSynchronize());
  return {approx.download(), poly.download()};
}

}  // namespace pgolf::test
