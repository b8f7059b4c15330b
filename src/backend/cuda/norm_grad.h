// The gradient of a norm's output [rows, dim] as the norm backward reads it: fp32 where several
// products accumulate into it (LoRA adapters, the attention gate's logits), bf16 where a single bf16
// GEMM wrote it. Under the references' bf16 autocast a linear's input gradient is the bf16 result of
// its product, so the bf16 copy is that rounding, at half the bytes of the fp32 write and read.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>

namespace pgolf::cuda {

struct NormGrad {
  const void* data = nullptr;
  bool is_bf16 = false;

  NormGrad() = default;
  NormGrad(std::nullptr_t) {}                                      // NOLINT: no gradient
  NormGrad(const float* p) : data(p) {}                            // NOLINT: fp32 rows
  NormGrad(const __nv_bfloat16* p) : data(p), is_bf16(true) {}     // NOLINT: bf16 rows
};

// Calls launch(p) with the typed pointer (const float* or const __nv_bfloat16*; null stays float).
template <typename F>
void dispatch_norm_grad(NormGrad g, F&& launch) {
  if (g.is_bf16) launch(static_cast<const __nv_bfloat16*>(g.data));
  else launch(static_cast<const float*>(g.data));
}

}  // namespace pgolf::cuda
