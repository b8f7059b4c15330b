// One 64x64x64 bf16 product on Hopper's warpgroup MMA through the building blocks of
// backend/cuda/wgmma.cuh, as the wgmma attention kernel uses them (A fragments by ldmatrix from a
// swizzled tile, B read through a descriptor), so that a layout error shows on plain matrices.
#pragma once

#include <cuda_bf16.h>

namespace pgolf::test {

// c[64][64] (fp32, row-major) = a · bᵀ when b_rows_are_n (b[n][k], the K-major operand, as K in Q·Kᵀ),
// else a · b (b[k][n], the MN-major operand, as V in P·V). a [64][64] row-major; all on the device.
// Runs one warpgroup and waits for it.
void wgmma_product_device(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, bool b_rows_are_n);

// The same product with A read by the tensor cores from a swizzled tile through a descriptor (as the
// wgmma attention backward reads K, V and dSᵀ): a [m][k] when a_rows_are_m (K-major, as K in Sᵀ = K·Qᵀ),
// else a [k][m] (MN-major, as dSᵀ [key][query] for dQ = dS·K); b as above.
void wgmma_product_shared_a_device(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, bool a_rows_are_m,
                                   bool b_rows_are_n);

}  // namespace pgolf::test
