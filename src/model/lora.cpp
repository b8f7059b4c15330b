#include "model/lora.h"

#include <cmath>

#include "core/error.h"

namespace pgolf {

int64_t lora_layout(const ModelConfig& m, const LoraConfig& c, int64_t rows, int slots,
                    std::vector<LoraAdapterLayout>& adapters) {
  PG_CHECK(c.rank > 0, "LoRA rank must be positive, got {}", c.rank);
  PG_CHECK(rows > 0 && slots > 0, "LoRA needs rows and slots, got {} rows and {} slots", rows, slots);
  const int64_t d = m.model_dim, r = c.rank;
  // Output dims per target: q [d -> q_dim], k and v [d -> kv_dim], o and mlp [d -> d], head [d -> V].
  const std::array<int64_t, kNumLoraTargets> out_dims = {m.q_dim(), m.kv_dim(), m.kv_dim(), d, d, m.vocab_size};
  adapters.assign(static_cast<size_t>(kNumLoraTargets) * slots, LoraAdapterLayout{});
  int64_t total = 0;
  // One adapter's B [rows, out, r] next in the array.
  auto place_b = [&](LoraAdapterLayout& a) {
    a.b_offset = total;
    total += rows * a.out * r;
  };
  auto adapter = [&](LoraTarget t, int s) -> LoraAdapterLayout& {
    LoraAdapterLayout& a = adapters[static_cast<size_t>(t) * slots + s];
    a.in = d;
    a.out = out_dims[static_cast<size_t>(t)];
    return a;
  };
  for (int s = 0; s < slots; ++s) {
    std::vector<LoraAdapterLayout*> group;
    for (LoraTarget t : kLoraGroupTargets)
      if (c.on(t)) group.push_back(&adapter(t, s));
    const int g = static_cast<int>(group.size());
    for (int i = 0; i < g; ++i) {  // A [rows, g, r, in]: row b's g matrices side by side
      LoraAdapterLayout& a = *group[static_cast<size_t>(i)];
      a.a_offset = total + i * r * d;
      a.a_stride = g * r * d;
      a.group_index = i, a.group_size = g;
    }
    total += rows * g * r * d;
    for (LoraAdapterLayout* a : group) place_b(*a);
    if (c.on(LoraTarget::Mlp)) {
      LoraAdapterLayout& a = adapter(LoraTarget::Mlp, s);
      a.a_offset = total, a.a_stride = r * a.in;
      total += rows * r * a.in;
      place_b(a);
    }
  }
  if (c.on(LoraTarget::Head)) {
    LoraAdapterLayout& a = adapter(LoraTarget::Head, 0);
    a.a_offset = total, a.a_stride = r * a.in;
    total += rows * r * a.in;
    place_b(a);
  }
  return total;
}

template <typename T>
LoraAdapters<T>::LoraAdapters(const ModelConfig& m, const LoraConfig& c, int64_t rows, int slots)
    : config_(c), rows_(rows), slots_(slots) {
  const int64_t total = lora_layout(m, c, rows, slots, adapters_);
  params_.assign(static_cast<size_t>(total), T(0));
  grads_.assign(static_cast<size_t>(total), T(0));
}

template <typename T>
const typename LoraAdapters<T>::Adapter* LoraAdapters<T>::find(LoraTarget target, int slot) const {
  if (!config_.on(target)) return nullptr;
  if (target == LoraTarget::Head) slot = 0;
  PG_CHECK(slot >= 0 && slot < slots_, "LoRA slot {} outside the {} virtual layers", slot, slots_);
  return &adapters_[static_cast<size_t>(target) * slots_ + slot];
}

template <typename T>
void LoraAdapters<T>::zero_grad() {
  std::fill(grads_.begin(), grads_.end(), T(0));
}

std::vector<LoraRowSegment> lora_row_segments(std::span<const LoraAdapterLayout> adapters, int rank) {
  std::vector<LoraRowSegment> segments;
  for (const LoraAdapterLayout& a : adapters) {
    if (a.a_offset < 0) continue;
    if (a.group_index == 0) segments.push_back({a.a_offset, a.a_stride});  // the group's A block
    segments.push_back({a.b_offset, a.out * rank});
  }
  return segments;
}

template <typename T>
void draw_lora_params(std::span<const LoraAdapterLayout> adapters, int64_t rows, int rank, Rng& rng,
                      std::span<T> params) {
  for (const LoraAdapterLayout& a : adapters) {
    if (a.a_offset < 0) continue;
    const int64_t per_row = rank * a.in;
    PG_CHECK(a.b_offset + rows * a.out * rank <= static_cast<int64_t>(params.size()) &&
                 a.a_offset + (rows - 1) * a.a_stride + per_row <= static_cast<int64_t>(params.size()),
             "draw_lora_params: the layout needs more than {} values", params.size());
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.in));
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t k = 0; k < per_row; ++k)
        params[a.a_offset + b * a.a_stride + k] = static_cast<T>(rng.uniform(-bound, bound));
    std::fill_n(params.begin() + a.b_offset, rows * a.out * rank, T(0));
  }
}

template <typename T>
void LoraAdapters<T>::reset(Rng& rng) {
  draw_lora_params<T>(adapters_, rows_, config_.rank, rng, params_);
}

template void draw_lora_params<float>(std::span<const LoraAdapterLayout>, int64_t, int, Rng&, std::span<float>);
template void draw_lora_params<double>(std::span<const LoraAdapterLayout>, int64_t, int, Rng&, std::span<double>);

template class LoraAdapters<float>;
template class LoraAdapters<double>;

}  // namespace pgolf
