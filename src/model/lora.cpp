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
  for (int t = 0; t < kNumLoraTargets; ++t) {
    if (!c.targets[static_cast<size_t>(t)]) continue;
    const int n_slots = static_cast<LoraTarget>(t) == LoraTarget::Head ? 1 : slots;
    for (int s = 0; s < n_slots; ++s) {
      LoraAdapterLayout& a = adapters[static_cast<size_t>(t) * slots + s];
      a.in = d;
      a.out = out_dims[static_cast<size_t>(t)];
      a.a_offset = total;
      total += rows * r * a.in;
      a.b_offset = total;
      total += rows * a.out * r;
    }
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

template <typename T>
void LoraAdapters<T>::reset(Rng& rng) {
  for (const Adapter& a : adapters_) {
    if (a.a_offset < 0) continue;
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.in));
    for (int64_t k = 0; k < rows_ * config_.rank * a.in; ++k)
      params_[a.a_offset + k] = static_cast<T>(rng.uniform(-bound, bound));
    std::fill_n(params_.begin() + a.b_offset, rows_ * a.out * config_.rank, T(0));
  }
}

template class LoraAdapters<float>;
template class LoraAdapters<double>;

}  // namespace pgolf
