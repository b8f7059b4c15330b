#include <cmath>
#include <string>

#include "backend/cuda/grad_clip.h"
#include "backend/cuda/reduce.cuh"

namespace pgolf::cuda {
namespace {

// A fixed grid: the partial sums, and so the norm's bits, are the same on every device.
constexpr int kPartials = 1024;
constexpr int kThreads = 256;

// partials[b] = Σ x² over the elements grid-strided to block b (fp64; 16-byte loads).
__global__ void __launch_bounds__(kThreads)
    sum_of_squares_partials(const float* __restrict__ x, int64_t count, double* __restrict__ partials) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = count / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  double sum = 0.0;
  for (int64_t i = tid; i < vectors; i += stride) {
    const float4 v = x4[i];
    sum += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y + static_cast<double>(v.z) * v.z +
           static_cast<double>(v.w) * v.w;
  }
  for (int64_t i = vectors * 4 + tid; i < count; i += stride) sum += static_cast<double>(x[i]) * x[i];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kPartials)
    finish_clip(const double* __restrict__ partials, float max_norm, GradClipState* __restrict__ state) {
  const double total = block_sum<kPartials>(partials[threadIdx.x]);
  if (threadIdx.x == 0) {
    const double norm = sqrt(total);
    state->norm = norm;
    state->coefficient = max_norm > 0.f ? optim::clip_coefficient_f32(static_cast<float>(norm), max_norm) : 1.f;
  }
}

}  // namespace

GradClip::GradClip(double max_norm)
    : max_norm_(max_norm), partials_(kPartials, "gradient-norm partial sums"), state_(1, "gradient clip state") {
  state_.upload({GradClipState{}});  // coefficient 1: what the optimizer reads when clipping is off
}

void GradClip::enqueue(const float* grads, int64_t count, cudaStream_t stream) {
  PG_CUDA_REQUIRE(reinterpret_cast<uintptr_t>(grads) % 16 == 0, "GradClip: the gradients must be 16-byte aligned");
  sum_of_squares_partials<<<kPartials, kThreads, 0, stream>>>(grads, count, partials_.data());
  PG_CUDA_LAUNCH_CHECK();
  finish_clip<<<1, kPartials, 0, stream>>>(partials_.data(), static_cast<float>(max_norm_), state_.data());
  PG_CUDA_LAUNCH_CHECK();
}

double GradClip::norm(cudaStream_t stream) const {
  GradClipState host;
  PG_CUDA_CHECK(cudaMemcpyAsync(&host, state_.data(), sizeof(host), cudaMemcpyDeviceToHost, stream));
  PG_CUDA_CHECK(cudaStreamSynchronize(stream));
  return checked_norm(host);
}

double GradClip::checked_norm(const GradClipState& host) {
  if (!std::isfinite(host.norm)) {
    const std::string msg = "the gradient norm is " + std::to_string(host.norm) + " (a NaN or infinite gradient)";
    raise_error(msg.c_str(), __FILE__, __LINE__);
  }
  return host.norm;
}

}  // namespace pgolf::cuda
