// The bf16 copies of the fp32 master weights that the GEMMs and lookups read, refreshed in one launch
// after every change of the weights (optimizer step, load), with late-QAT fake quantization (twin of
// cpu/fake_quant.h: per-row int6, s = max(max|w|/31, 1/31), Q(w) = clamp(rint(w/s), −32, 31)·s in
// fp32, then rounded to bf16) on the matrices that take it when it is switched on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

// One matrix: rows × cols fp32 values at params + src → bf16 at out + dst (element offsets).
struct WeightCopy {
  int64_t src = 0, dst = 0;
  int64_t first_row = 0;  // rows of the copies before this one (the table is in this order)
  int rows = 0, cols = 0;
  bool quantize = false;  // a late-QAT matrix (CastedLinear)
};

// copies: device table of n_copies entries covering total_rows rows; `quantize` switches late QAT on.
void refresh_bf16_weights(const float* params, __nv_bfloat16* out, const WeightCopy* copies, int n_copies,
                          int64_t total_rows, bool quantize, cudaStream_t stream);

// out = bf16(in) over n values.
void cast_to_bf16(const float* in, __nv_bfloat16* out, int64_t n, cudaStream_t stream);

}  // namespace pgolf::cuda
