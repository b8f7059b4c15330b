#include "backend/cuda/adamw.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    adamw_chunks(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ exp_avg,
                 float* __restrict__ exp_avg_sq, const AdamChunk* __restrict__ chunks,
                 const OptimizerStepScalars* __restrict__ scalars, const GradClipState* __restrict__ clip) {
  const AdamChunk chunk = chunks[blockIdx.x];
  const optim::AdamCoeffs coeffs = chunk.group == AdamGroup::kEmbed ? scalars->embed : scalars->scalar;
  const float clip_coef = clip->coefficient;
  float* p = params + chunk.param_offset;
  const float* g = grads + chunk.param_offset;
  float* m = exp_avg + chunk.state_offset;
  float* v = exp_avg_sq + chunk.state_offset;
  for (int32_t i = threadIdx.x; i < chunk.length; i += kThreads) {
    float value = p[i], first = m[i], second = v[i];
    optim::adamw_update(value, g[i] * clip_coef, first, second, coeffs);
    p[i] = value;
    m[i] = first;
    v[i] = second;
  }
}

}  // namespace

MultiTensorAdamW::MultiTensorAdamW(const std::vector<AdamTensor>& tensors) {
  std::vector<AdamChunk> chunks;
  for (const AdamTensor& t : tensors) {
    state_offsets_.push_back(state_size_);
    for (int64_t done = 0; done < t.numel; done += kChunkElems) {
      const int64_t length = t.numel - done < kChunkElems ? t.numel - done : kChunkElems;
      chunks.push_back(AdamChunk{t.param_offset + done, state_size_ + done, static_cast<int32_t>(length), t.group});
    }
    state_size_ += t.numel;
  }
  if (!chunks.empty()) chunks_ = DeviceBuffer<AdamChunk>(chunks, "AdamW chunk table");
  if (state_size_ > 0) {
    exp_avg_ = DeviceBuffer<float>(static_cast<size_t>(state_size_), "AdamW exp_avg");
    exp_avg_sq_ = DeviceBuffer<float>(static_cast<size_t>(state_size_), "AdamW exp_avg_sq");
    exp_avg_.fill_bytes(0);
    exp_avg_sq_.fill_bytes(0);
  }
}

void MultiTensorAdamW::enqueue(float* params, const float* grads, const OptimizerStepScalars* scalars,
                               const GradClipState* clip, cudaStream_t stream) {
  if (chunks_.size() == 0) return;
  adamw_chunks<<<static_cast<unsigned>(chunks_.size()), kThreads, 0, stream>>>(
      params, grads, exp_avg_.data(), exp_avg_sq_.data(), chunks_.data(), scalars, clip);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
