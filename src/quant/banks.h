// s1560 stores its block matrices in four parameter banks; its quantizer works on the per-layer
// matrices (golden README, "S1560 unbanked names"). With L layers:
//   qo_bank [2L, d, d]        slice i -> blocks.i.attn.c_q.weight,  slice L+i -> blocks.i.attn.proj.weight
//   kv_bank [2L, kv, d]       slice i -> blocks.i.attn.c_k.weight,  slice L+i -> blocks.i.attn.c_v.weight
//   mlp_up_bank [L, hid, d]   slice i -> blocks.i.mlp.fc.weight
//   mlp_down_bank [L, d, hid] slice i -> blocks.i.mlp.proj.weight
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"

namespace pgolf {

bool is_bank_name(const std::string& name);
bool has_banks(const TensorMap& tensors);

// Replaces each bank by its per-layer matrices (in the reference's order: per layer, the first half's
// slice then the second half's); every other tensor is kept, in order.
TensorMap unbank(const TensorMap& banked);

// Inverse of unbank for a model of `num_layers` layers: the per-layer matrices become the four banks
// (each at the position of its first slice); every other tensor is kept, in order.
TensorMap rebank(const TensorMap& unbanked, int64_t num_layers);

}  // namespace pgolf
