// TMA tensor maps (Hopper) of bf16 matrices, as the wgmma kernels read them: 2-D, row-major, boxes of
// 64 columns (one 128-byte row of a swizzled tile, wgmma.cuh) with the 128-byte swizzle.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace pgolf::cuda {

// A row-major bf16 matrix [outer, inner] (rows of `inner` contiguous values) read in boxes of
// box_outer rows x 64 columns, swizzled as SwizzledTile64 stores them; boxes past the edges read
// zeros. `base` and the row pitch (inner · 2 bytes) must be multiples of 16 bytes.
CUtensorMap swizzled_tensor_map(const __nv_bfloat16* base, uint64_t inner, uint64_t outer, uint32_t box_outer);

}  // namespace pgolf::cuda
