#include "backend/cuda/gpu_ema.h"

#include "backend/cuda/averaging.h"
#include "optim/averaging.h"

namespace pgolf::cuda {

GpuEma::GpuEma(const ParamLayout& layout, const float* initial_params, double decay)
    : layout_(layout), average_(static_cast<size_t>(layout.total()), "EMA of the parameters"), decay_(decay) {
  PG_CHECK(decay >= 0.0 && decay < 1.0, "ema_decay must be in [0, 1), got {}", decay);
  PG_CUDA_CHECK(cudaMemcpy(average_.data(), initial_params, average_.bytes(), cudaMemcpyDeviceToDevice));
}

void GpuEma::update(const float* params, cudaStream_t stream) {
  ema_update(average_.data(), params, layout_.total(), decay_, stream);
}

void GpuEma::copy_to(float* params, cudaStream_t stream) const {
  PG_CUDA_CHECK(cudaMemcpyAsync(params, average_.data(), average_.bytes(), cudaMemcpyDeviceToDevice, stream));
}

TensorMap GpuEma::state_tensors() const {
  PG_CUDA_CHECK(cudaDeviceSynchronize());
  ParamSet<float> host(layout_);
  PG_CUDA_CHECK(cudaMemcpy(host.all().data(), average_.data(), average_.bytes(), cudaMemcpyDeviceToHost));
  return optim::Ema(host, decay_).state_tensors();
}

void GpuEma::load_state_tensors(const TensorMap& t, const std::string& what) {
  optim::Ema host(ParamSet<float>(layout_), decay_);
  host.load_state_tensors(t, what);
  PG_CUDA_CHECK(cudaDeviceSynchronize());
  PG_CUDA_CHECK(cudaMemcpy(average_.data(), host.average().all().data(), average_.bytes(), cudaMemcpyHostToDevice));
}

}  // namespace pgolf::cuda
