// Per-row low-rank adapters (SPEC §6.5, BatchedLinearLoRA): every row b of the batch (one document)
// has its own A_b [r, in] and B_b [out, r]; for the row's T tokens y_b += (x_b A_bᵀ) B_bᵀ.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

struct LoraShape {
  int64_t rows = 0;     // batch rows (one adapter pair each)
  int64_t seq_len = 0;  // tokens per row
  int64_t in = 0, out = 0, rank = 0;
  int64_t a_stride = 0;  // values from row b's A (and dA) to row b + 1's (0: rank·in)
};

// x [rows·T, in], A_b [r, in] at A + b·a_stride, B [rows, out, r]; h [rows·T, r] = x Aᵀ is saved; y [rows·T, out] +=.
template <typename T>
void lora_forward(const T* x, const T* A, const T* B, T* h, T* y, const LoraShape& s);

// dB_b += dy_bᵀ h_b; dh = dy_b B_b; dA_b += dhᵀ x_b; dx_b += dh A_b (dx may be null).
template <typename T>
void lora_backward(const T* dy, const T* x, const T* A, const T* B, const T* h, T* dx, T* dA, T* dB,
                   const LoraShape& s);

}  // namespace pgolf::cpu
