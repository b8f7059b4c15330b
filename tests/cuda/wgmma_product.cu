#include "wgmma_product.h"

#include "backend/cuda/check.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::test {
namespace {

using cuda::SwizzledTile64;

constexpr int kTileBytes = 64 * 128;  // 64 rows of 64 bf16

// d[4j + e]: row 16·warp + lane / 4 + 8·(e / 2), column 8j + 2·(lane % 4) + e % 2.
__device__ void store_accumulators(const float (&d)[32], float* c, int warp, int lane) {
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int row = warp * 16 + (lane >> 2) + ((i >> 1) & 1) * 8;
    const int col = (i >> 2) * 8 + 2 * (lane & 3) + (i & 1);
    c[row * 64 + col] = d[i];
  }
}

template <bool kBRowsAreN>
__global__ void __launch_bounds__(128) wgmma_product_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) unsigned char smem[2 * kTileBytes];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SwizzledTile64 a_tile{cuda::smem_address(smem)}, b_tile{cuda::smem_address(smem + kTileBytes)};
  a_tile.load_async<64, 128>(a, 64, 64, tid);
  b_tile.load_async<64, 128>(b, 64, 64, tid);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  cuda::fence_proxy_async_shared();
  __syncthreads();

  uint32_t a_frag[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) cuda::ldmatrix_x4(a_frag[kk], cuda::a_fragment_address(a_tile, warp * 16, kk * 16, lane));
  float d[32];
  cuda::wgmma_fence();
  if constexpr (kBRowsAreN) {
    cuda::wgmma_m64n64k16_bf16<false, 0>(d, a_frag[0], cuda::k_major_step_descriptor(b_tile.base, 0));
#pragma unroll
    for (int kk = 1; kk < 4; ++kk)
      cuda::wgmma_m64n64k16_bf16<true, 0>(d, a_frag[kk], cuda::k_major_step_descriptor(b_tile.base, kk));
  } else {
    cuda::wgmma_m64n64k16_bf16<false, 1>(d, a_frag[0], cuda::mn_major_step_descriptor(b_tile.base, 0));
#pragma unroll
    for (int kk = 1; kk < 4; ++kk)
      cuda::wgmma_m64n64k16_bf16<true, 1>(d, a_frag[kk], cuda::mn_major_step_descriptor(b_tile.base, kk));
  }
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>();
  cuda::wgmma_fence_operands(d);
  store_accumulators(d, c, warp, lane);
#else
  __trap();  // needs an sm_90a build
#endif
}

// A and B both from shared memory; imm-trans-a / imm-trans-b = 1 for the MN-major orders.
template <bool kARowsAreM, bool kBRowsAreN>
__global__ void __launch_bounds__(128)
    wgmma_product_shared_a_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) unsigned char smem[2 * kTileBytes];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SwizzledTile64 a_tile{cuda::smem_address(smem)}, b_tile{cuda::smem_address(smem + kTileBytes)};
  a_tile.load_async<64, 128>(a, 64, 64, tid);
  b_tile.load_async<64, 128>(b, 64, 64, tid);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  cuda::fence_proxy_async_shared();
  __syncthreads();

  constexpr int kTransA = kARowsAreM ? 0 : 1, kTransB = kBRowsAreN ? 0 : 1;
  auto a_step = [&](int kk) {
    return kARowsAreM ? cuda::k_major_step_descriptor(a_tile.base, kk) : cuda::mn_major_step_descriptor(a_tile.base, kk);
  };
  auto b_step = [&](int kk) {
    return kBRowsAreN ? cuda::k_major_step_descriptor(b_tile.base, kk) : cuda::mn_major_step_descriptor(b_tile.base, kk);
  };
  float d[32];
  cuda::wgmma_fence();
  cuda::wgmma_m64n64k16_bf16_ss<false, kTransA, kTransB>(d, a_step(0), b_step(0));
#pragma unroll
  for (int kk = 1; kk < 4; ++kk) cuda::wgmma_m64n64k16_bf16_ss<true, kTransA, kTransB>(d, a_step(kk), b_step(kk));
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>();
  cuda::wgmma_fence_operands(d);
  store_accumulators(d, c, warp, lane);
#else
  __trap();  // needs an sm_90a build
#endif
}

}  // namespace

void wgmma_product_device(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, bool b_rows_are_n) {
  if (b_rows_are_n) wgmma_product_kernel<true><<<1, 128>>>(a, b, c);
  else wgmma_product_kernel<false><<<1, 128>>>(a, b, c);
  PG_CUDA_LAUNCH_CHECK();
  PG_CUDA_CHECK(cudaDeviceSynchronize());
}

void wgmma_product_shared_a_device(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, bool a_rows_are_m,
                                   bool b_rows_are_n) {
  if (a_rows_are_m && b_rows_are_n) wgmma_product_shared_a_kernel<true, true><<<1, 128>>>(a, b, c);
  else if (a_rows_are_m) wgmma_product_shared_a_kernel<true, false><<<1, 128>>>(a, b, c);
  else if (b_rows_are_n) wgmma_product_shared_a_kernel<false, true><<<1, 128>>>(a, b, c);
  else wgmma_product_shared_a_kernel<false, false><<<1, 128>>>(a, b, c);
  PG_CUDA_LAUNCH_CHECK();
  PG_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace pgolf::test
