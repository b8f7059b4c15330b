// GpuLora: per-row LoRA adapters on the device, in the flat layout of LoraAdapters (model/lora.h).
#include "backend/cuda/gpu_model_impl.h"
#include "core/error.h"

namespace pgolf::cuda {

const LoraAdapterLayout* GpuLora::Impl::find(LoraTarget target, int slot) const {
  if (!config.on(target)) return nullptr;
  if (target == LoraTarget::Head) slot = 0;
  PG_CHECK(slot >= 0 && slot < slots, "LoRA slot {} outside the {} virtual layers", slot, slots);
  return &adapters[static_cast<size_t>(target) * slots + slot];
}

bf16* GpuLora::Impl::hidden_of(LoraTarget target, int slot) const {
  if (target == LoraTarget::Head) slot = 0;
  return hidden[static_cast<size_t>(target) * slots + slot];
}

GpuLora::GpuLora(const ModelConfig& model, const LoraConfig& config, int64_t rows, int slots, int64_t seq_len)
    : impl_(std::make_unique<Impl>()) {
  Impl& l = *impl_;
  l.config = config, l.rows = rows, l.slots = slots, l.seq_len = seq_len;
  PG_CHECK(seq_len > 0, "GpuLora: seq_len must be positive, got {}", seq_len);
  PG_CHECK(config.rank % 8 == 0, "GpuLora: rank {} must be a multiple of 8 (16-byte GEMM rows)", config.rank);
  l.total = lora_layout(model, config, rows, slots, l.adapters);
  for (const LoraAdapterLayout& a : l.adapters)
    if (a.a_offset >= 0)
      PG_CHECK(a.in % 8 == 0 && a.out % 8 == 0, "GpuLora: adapter dims {} -> {} must be multiples of 8", a.in, a.out);
  l.params = DeviceBuffer<float>(static_cast<size_t>(l.total), "LoRA parameters");
  l.grads = DeviceBuffer<float>(static_cast<size_t>(l.total), "LoRA gradients");
  l.params16 = DeviceBuffer<bf16>(static_cast<size_t>(l.total), "LoRA bf16 parameters");
  l.params.fill_bytes(0);
  l.grads.fill_bytes(0);
  const int64_t per_adapter = rows * seq_len * config.rank;
  int present = 0;
  for (const LoraAdapterLayout& a : l.adapters) present += a.a_offset >= 0 ? 1 : 0;
  l.hidden_storage = DeviceBuffer<bf16>(static_cast<size_t>(present * per_adapter), "LoRA hidden states");
  l.dh = DeviceBuffer<bf16>(static_cast<size_t>(per_adapter), "LoRA backward scratch");
  l.hidden.assign(l.adapters.size(), nullptr);
  int next = 0;
  for (size_t i = 0; i < l.adapters.size(); ++i)
    if (l.adapters[i].a_offset >= 0) l.hidden[i] = l.hidden_storage.data() + (next++) * per_adapter;
}

GpuLora::~GpuLora() = default;

const LoraConfig& GpuLora::config() const { return impl_->config; }
int64_t GpuLora::rows() const { return impl_->rows; }
int GpuLora::slots() const { return impl_->slots; }
int64_t GpuLora::seq_len() const { return impl_->seq_len; }
int64_t GpuLora::total() const { return impl_->total; }
float* GpuLora::params() { return impl_->params.data(); }
float* GpuLora::grads() { return impl_->grads.data(); }

void GpuLora::upload(std::span<const float> params) {
  PG_CHECK(static_cast<int64_t>(params.size()) == impl_->total, "GpuLora::upload: {} values for a layout of {}",
           params.size(), impl_->total);
  PG_CUDA_CHECK(cudaMemcpy(impl_->params.data(), params.data(), params.size() * 4, cudaMemcpyHostToDevice));
  impl_->stale = true;
}

void GpuLora::download_params(std::span<float> out) const {
  PG_CHECK(static_cast<int64_t>(out.size()) == impl_->total, "GpuLora::download_params: {} values for a layout of {}",
           out.size(), impl_->total);
  PG_CUDA_CHECK(cudaMemcpy(out.data(), impl_->params.data(), out.size() * 4, cudaMemcpyDeviceToHost));
}
std::vector<float> GpuLora::download_grads() const { return impl_->grads.download(); }
void GpuLora::zero_grad() { impl_->grads.fill_bytes(0); }
void GpuLora::params_changed() { impl_->stale = true; }

}  // namespace pgolf::cuda
