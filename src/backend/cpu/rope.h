// Rotary position embedding, half-split convention (not interleaved), on the first `rope_dims`
// dims of every head; the remaining dims pass through (SPEC §3.5.4):
//   out[j]      =  x[j]·cos θ + x[j+half]·sin θ
//   out[j+half] = -x[j]·sin θ + x[j+half]·cos θ,   θ = pos·inv_freq[j], j < half = rope_dims/2.
// The table is computed in fp32 exactly as the references do (inv_freq = 1/base^(2j/rd) and the
// angles pos·inv_freq in fp32, cos/sin in fp32), then used at the activation precision.
#pragma once

#include <cstdint>
#include <vector>

namespace pgolf::cpu {

struct RopeTable {
  int rope_dims = 0;
  int max_positions = 0;
  std::vector<float> cos, sin;  // [max_positions, rope_dims/2]
};

// `base` is the effective base (after any NTK rescaling, ModelConfig::rope_base_at).
RopeTable make_rope_table(double base, int rope_dims, int max_positions);

// x[N, heads, head_dim] rotated in place; positions[N] index the table's rows.
template <typename T>
void rope_forward(T* x, const int32_t* positions, const RopeTable& table, int64_t N, int heads, int head_dim);

// The transpose rotation, in place on the gradient: dx = Rᵀ dy.
template <typename T>
void rope_backward(T* dx, const int32_t* positions, const RopeTable& table, int64_t N, int heads, int head_dim);

}  // namespace pgolf::cpu
