// Deterministic block reductions: warp shuffles, then the warps' sums in a fixed order through
// shared memory. The result is returned to every thread; the fixed tree makes it the same bits
// on every run.
#pragma once

#include <cuda_runtime.h>

namespace pgolf::cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block's kThreads threads (a multiple of 32, at most 1024).
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum: whole warps, at most 1024 threads");
  constexpr int kWarps = kThreads / 32;
  __shared__ T warp_sums[kWarps];
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = lane < kWarps ? warp_sums[lane] : T(0);
  total = warp_sum(total);
  __syncthreads();  // warp_sums may be reused by the caller's next reduction
  return total;
}

}  // namespace pgolf::cuda
