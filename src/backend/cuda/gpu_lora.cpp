// GpuLora: per-row LoRA adapters on the device, in the flat layout of LoraAdapters (model/lora.h).
#include <algorithm>
#include <cmath>

#include "backend/cuda/gpu_model_impl.h"
#include "backend/cuda/lora.h"
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

const LoraAdapterLayout* GpuLora::Impl::group_lead(int slot) const {
  for (LoraTarget t : kLoraGroupTargets)
    if (const LoraAdapterLayout* a = find(t, slot)) return a->group_size > 1 ? a : nullptr;
  return nullptr;
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
  int present = 0, widest = 1;
  for (const LoraAdapterLayout& a : l.adapters) {
    present += a.a_offset >= 0 ? 1 : 0;
    widest = std::max(widest, a.group_size);
  }
  l.hidden_storage = DeviceBuffer<bf16>(static_cast<size_t>(present * per_adapter), "LoRA hidden states");
  l.dh = DeviceBuffer<bf16>(static_cast<size_t>(widest * per_adapter), "LoRA backward scratch");
  l.group_input.assign(static_cast<size_t>(slots), nullptr);
  const std::vector<LoraRowSegment> segments = lora_row_segments(l.adapters, config.rank);
  for (const LoraRowSegment& seg : segments) l.max_per_row = std::max(l.max_per_row, seg.per_row);
  l.segment_count = static_cast<int>(segments.size());
  if (!segments.empty()) l.segments = DeviceBuffer<LoraRowSegment>(segments, "LoRA row segments");
  // A group's h [rows·T, g·rank] takes g adapters' storage; member i's is its columns [i·rank, (i + 1)·rank).
  l.hidden.assign(l.adapters.size(), nullptr);
  int64_t next = 0;  // values of hidden_storage handed out
  for (int s = 0; s < slots; ++s) {
    const LoraAdapterLayout* lead = l.group_lead(s);
    if (!lead) continue;
    for (LoraTarget t : kLoraGroupTargets)
      if (const LoraAdapterLayout* a = l.find(t, s))
        l.hidden[static_cast<size_t>(a - l.adapters.data())] = l.hidden_storage.data() + next + a->group_index * config.rank;
    next += lead->group_size * per_adapter;
  }
  for (size_t i = 0; i < l.adapters.size(); ++i)
    if (l.adapters[i].a_offset >= 0 && !l.hidden[i]) {
      l.hidden[i] = l.hidden_storage.data() + next;
      next += per_adapter;
    }
  PG_CHECK(next == present * per_adapter, "GpuLora: {} hidden values handed out of {}", next, present * per_adapter);
}

void GpuLora::Impl::prepare(int64_t n, cudaStream_t stream) {
  PG_CHECK(n >= 0 && n <= rows, "GpuLora: {} rows of adapters for {}", rows, n);
  if (!stale && n <= cast_rows) return;
  lora_rows_to_bf16(params.data(), params16.data(), segments.data(), segment_count, n, max_per_row, stream);
  stale = false;
  cast_rows = n;
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
void GpuLora::draw(uint64_t seed, cudaStream_t stream) {
  Impl& l = *impl_;
  // draw_lora_params's order: adapter by adapter, each A's rows·rank·in draws row by row.
  uint64_t first = 0;
  for (const LoraAdapterLayout& a : l.adapters) {
    if (a.a_offset < 0) continue;
    const int64_t per_row = l.config.rank * a.in, n = l.rows * per_row;
    lora_uniform(l.params.data() + a.a_offset, n, seed, first, 1.0 / std::sqrt(static_cast<double>(a.in)), per_row,
                 a.a_stride, stream);
    first += static_cast<uint64_t>(n);
    PG_CUDA_CHECK(cudaMemsetAsync(l.params.data() + a.b_offset, 0,
                                  static_cast<size_t>(l.rows * a.out * l.config.rank) * sizeof(float), stream));
  }
  l.stale = true;
}

void GpuLora::copy_params_from(const GpuLora& other, cudaStream_t stream) {
  const Impl& o = *other.impl_;
  Impl& l = *impl_;
  PG_CHECK(o.total == l.total && o.rows == l.rows && o.slots == l.slots,
           "GpuLora::copy_params_from: layouts differ ({} / {} values, {} / {} rows)", o.total, l.total, o.rows, l.rows);
  PG_CUDA_CHECK(cudaMemcpyAsync(l.params.data(), o.params.data(), static_cast<size_t>(l.total) * sizeof(float),
                                cudaMemcpyDeviceToDevice, stream));
  l.stale = true;
}

std::vector<float> GpuLora::download_grads() const { return impl_->grads.download(); }
void GpuLora::zero_grad() { impl_->grads.fill_bytes(0); }
void GpuLora::params_changed() { impl_->stale = true; }
void GpuLora::set_overwrite_grads(bool on) { impl_->overwrite_grads = on; }

void GpuLora::adamw_rows(int64_t n, float* exp_avg, float* exp_avg_sq, const optim::AdamCoeffs* coeffs,
                         cudaStream_t stream) {
  Impl& l = *impl_;
  PG_CHECK(n >= 0 && n <= l.rows, "GpuLora::adamw_rows: {} rows of adapters for {}", l.rows, n);
  // The bf16 copies of rows [0, n) are written with the step. prepare() cast at least the rows of the
  // forward before it (n of them), and the other rows did not move: the copies stay current.
  const bool current = !l.stale && l.cast_rows >= n;
  lora_rows_adamw(l.params.data(), l.grads.data(), exp_avg, exp_avg_sq, current ? l.params16.data() : nullptr,
                  coeffs, l.segments.data(), l.segment_count, n, l.max_per_row, stream);
  if (!current) l.stale = true;
}

}  // namespace pgolf::cuda
