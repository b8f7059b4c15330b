#include "quant/banks.h"

#include <cstring>

namespace pgolf {

namespace {

struct BankLayout {
  const char* bank;
  const char* first;   // per-layer name of slices [0, L): "blocks.{i}.<first>"
  const char* second;  // per-layer name of slices [L, 2L), or nullptr for single-half banks
};

constexpr BankLayout kBanks[] = {
    {"qo_bank", "attn.c_q.weight", "attn.proj.weight"},
    {"kv_bank", "attn.c_k.weight", "attn.c_v.weight"},
    {"mlp_up_bank", "mlp.fc.weight", nullptr},
    {"mlp_down_bank", "mlp.proj.weight", nullptr},
};

std::string layer_name(int64_t i, const char* suffix) { return "blocks." + std::to_string(i) + "." + suffix; }

HostTensor slice(const HostTensor& bank, int64_t k) {
  Shape s(bank.shape.begin() + 1, bank.shape.end());
  HostTensor out(bank.dtype, s);
  std::memcpy(out.bytes.data(), bank.bytes.data() + k * out.bytes.size(), out.bytes.size());
  return out;
}

}  // namespace

bool is_bank_name(const std::string& name) {
  for (auto& b : kBanks)
    if (name == b.bank) return true;
  return false;
}

bool has_banks(const TensorMap& tensors) {
  for (auto& b : kBanks)
    if (tensors.has(b.bank)) return true;
  return false;
}

TensorMap unbank(const TensorMap& banked) {
  TensorMap out;
  for (const auto& name : banked.names()) {
    const HostTensor& t = banked.get(name);
    const BankLayout* layout = nullptr;
    for (auto& b : kBanks)
      if (name == b.bank) layout = &b;
    if (!layout) {
      out.set(name, t);
      continue;
    }
    PG_CHECK(t.shape.size() == 3, "bank '{}' has shape {}, expected 3 dimensions", name, shape_str(t.shape));
    const int64_t halves = layout->second ? 2 : 1;
    PG_CHECK(t.shape[0] % halves == 0, "bank '{}' has {} slices, not a multiple of {}", name, t.shape[0], halves);
    const int64_t L = t.shape[0] / halves;
    for (int64_t i = 0; i < L; ++i) {
      out.set(layer_name(i, layout->first), slice(t, i));
      if (layout->second) out.set(layer_name(i, layout->second), slice(t, L + i));
    }
  }
  return out;
}

TensorMap rebank(const TensorMap& unbanked, int64_t num_layers) {
  // Which bank (and slice) each per-layer name belongs to.
  auto owner = [&](const std::string& name, int64_t* slice_index) -> const BankLayout* {
    for (auto& b : kBanks)
      for (int64_t i = 0; i < num_layers; ++i) {
        if (name == layer_name(i, b.first)) return *slice_index = i, &b;
        if (b.second && name == layer_name(i, b.second)) return *slice_index = num_layers + i, &b;
      }
    return nullptr;
  };
  TensorMap out;
  for (const auto& name : unbanked.names()) {
    int64_t k = 0;
    const BankLayout* b = owner(name, &k);
    if (!b) {
      out.set(name, unbanked.get(name));
      continue;
    }
    if (out.has(b->bank)) continue;  // already assembled at its first slice
    const int64_t slices = (b->second ? 2 : 1) * num_layers;
    std::vector<std::string> members;
    for (int64_t i = 0; i < num_layers; ++i) members.push_back(layer_name(i, b->first));
    if (b->second)
      for (int64_t i = 0; i < num_layers; ++i) members.push_back(layer_name(i, b->second));
    const HostTensor& first = unbanked.get(members[0]);
    Shape bank_shape = {slices};
    bank_shape.insert(bank_shape.end(), first.shape.begin(), first.shape.end());
    HostTensor bank(first.dtype, bank_shape);
    for (int64_t s = 0; s < slices; ++s) {
      PG_CHECK(unbanked.has(members[s]), "rebanking '{}': '{}' is missing", b->bank, members[s]);
      const HostTensor& m = unbanked.get(members[s]);
      PG_CHECK(m.shape == first.shape && m.dtype == first.dtype,
               "rebanking '{}': '{}' is {} {}, expected {} {} like '{}'", b->bank, members[s], dtype_name(m.dtype),
               shape_str(m.shape), dtype_name(first.dtype), shape_str(first.shape), members[0]);
      std::memcpy(bank.bytes.data() + s * m.bytes.size(), m.bytes.data(), m.bytes.size());
    }
    out.set(b->bank, std::move(bank));
  }
  return out;
}

}  // namespace pgolf
