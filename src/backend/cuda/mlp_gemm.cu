// Fused MLP products on Hopper's warpgroup MMA (wgmma, sm_90a); mlp_gemm.h states what they compute.
//
// One block of 2 warpgroups owns 128 rows of the input (A = m or df, [rows, 512]) and sweeps every
// 128-column tile of the hidden dimension. A is read from global memory once: its eight 128 x 64
// k-slices (128 KB) stay in shared memory for the whole sweep, while B (the weight, L2-resident) streams
// through a 4-stage cp.async pipeline, one 128 x 64 slice per k-step, 2 steps ahead. Each warpgroup
// computes its 64 rows x 128 columns with wgmma m64n128k16, both operands from 128-byte-swizzled tiles
// (wgmma.cuh): A K-major; B K-major in the forward (Wfc rows = hidden), MN-major in the backward (Wproj
// rows = k, stored as two 64-column tiles 8 KB apart).
//
// Epilogue per tile and warpgroup, through a 64 x 128 bf16 staging tile of its own: when the tile's
// MMAs are done, its accumulators rounded to bf16 (pre in the forward, dpost in the backward) go to
// the staging tile at their fragment positions, and leave in 16-byte chunks during the next tile's 8
// k-steps, one chunk per thread and k-step, issued while that step's MMAs run, so that the output
// traffic overlaps the products instead of following them (the last tile drains at the end). A chunk
// of the forward is written as pre and, activated, as post; one of the backward becomes dpre =
// bf16(dpost · f'(pre)) with pre's chunk loaded (16 bytes, coalesced) a whole tile earlier, at the
// same k-step of the tile's own computation. dpost itself is never written.
// Step s = 8j + k (tile j, k-step k) runs: wait for stage s, barrier, start loading step s + 2 into the
// stage that step s - 2 used (its MMAs finished: every warpgroup waited for them in step s - 1 before
// this barrier), issue the 4 MMAs of step s, drain chunk k of tile j - 1, wait for the MMAs of step s - 1.
#include "backend/cuda/activation.cuh"
#include "backend/cuda/check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kDim = 512;                  // K: the model width the kernels are built for
constexpr int kBlockM = 128;               // rows per block: two warpgroups of 64
constexpr int kBlockN = 128;               // hidden columns per tile
constexpr int kStepK = 64;                 // k per step: one 128-byte swizzled row
constexpr int kSteps = kDim / kStepK;      // k-steps per tile
constexpr int kStages = 4, kAhead = 2;     // B stages in shared memory; steps loaded ahead
constexpr int kThreads = 256;
constexpr uint32_t kSliceBytes = kBlockM * 128;         // one A k-slice: 128 rows of 64 bf16
constexpr uint32_t kStageBytes = kBlockN * 128;         // one B k-slice: 128 x 64 bf16
constexpr uint32_t kHalfTileBytes = 64 * 128;           // 64 rows of 64 bf16
constexpr uint32_t kStagingBytes = 2 * kHalfTileBytes;  // a warpgroup's 64 x 128 bf16 output tile
constexpr uint32_t kAtomBytes = 1024;                   // swizzled tiles start on this (wgmma.cuh)
constexpr int kSmemBytes = kSteps * kSliceBytes + kStages * kStageBytes + 2 * kStagingBytes + kAtomBytes;

struct MlpGemmParams {
  const bf16* a;    // [rows, 512]: m (forward) or df (backward)
  const bf16* b;    // Wfc [hidden, 512] (forward) or Wproj [512, hidden] (backward)
  const bf16* pre;  // backward: [rows, hidden]
  bf16* out;        // forward: pre; backward: dpre
  bf16* post;       // forward: post
  int64_t rows;
  int hidden;
  float slope;
};

__device__ __forceinline__ void st_shared_u32(uint32_t address, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(address)
               : "memory");
  return v;
}
// Barrier of the 128 threads of one warpgroup (ids 1, 2; 0 is __syncthreads').
__device__ __forceinline__ void warpgroup_barrier(int warpgroup) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + warpgroup) : "memory");
}

__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

template <bool kBackward>
__global__ void __launch_bounds__(kThreads, 1) mlp_fused_gemm_kernel(const MlpGemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2, wg_tid = tid & 127;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int valid_rows = static_cast<int>(min(static_cast<int64_t>(kBlockM), p.rows - row0));
  const int wg_valid_rows = valid_rows - 64 * warpgroup;  // may be <= 0 in the last block
  const int tiles = p.hidden / kBlockN, steps = tiles * kSteps;

  const uint32_t base = (smem_address(smem) + (kAtomBytes - 1)) & ~(kAtomBytes - 1);
  auto a_slice = [&](int k) { return SwizzledTile64{base + k * kSliceBytes}; };
  const uint32_t stages = base + kSteps * kSliceBytes;
  auto stage = [&](int s) { return stages + static_cast<uint32_t>(s % kStages) * kStageBytes; };
  const uint32_t staging = stages + kStages * kStageBytes + warpgroup * kStagingBytes;
  auto staging_half = [&](int half) { return SwizzledTile64{staging + half * kHalfTileBytes}; };

  const bf16* a_rows = p.a + row0 * kDim;
  auto load_step = [&](int s) {
    const int j = s / kSteps, k = s % kSteps;
    if (s < kSteps) a_slice(k).template load_async<kBlockM, kThreads>(a_rows + k * kStepK, kDim, valid_rows, tid);
    if constexpr (!kBackward) {
      // Wfc rows 128j.., columns 64k..: rows = n.
      SwizzledTile64{stage(s)}.template load_async<kBlockN, kThreads>(
          p.b + static_cast<int64_t>(j * kBlockN) * kDim + k * kStepK, kDim, kBlockN, tid);
    } else {
      // Wproj rows 64k.. (= k), columns 128j..: two 64-column tiles.
      const bf16* src = p.b + static_cast<int64_t>(k * kStepK) * p.hidden + j * kBlockN;
#pragma unroll
      for (int half = 0; half < 2; ++half)
        SwizzledTile64{stage(s) + half * kHalfTileBytes}.template load_async<kStepK, kThreads>(src + half * 64, p.hidden,
                                                                                              kStepK, tid);
    }
  };

  // The tile's accumulators rounded to bf16 (pre, or dpost) at their fragment positions of the staging
  // tile: acc[4jn + 2r + e] is row frag_row + 8r, column 8jn + frag_col + e.
  const int frag_row = (warp & 3) * 16 + (lane >> 2), frag_col = 2 * (lane & 3);
  auto stage_output = [&](const float (&acc)[64]) {
#pragma unroll
    for (int jn = 0; jn < 16; ++jn) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        st_shared_u32(staging_half(jn / 8).pair_address(frag_row + 8 * r, 8 * (jn % 8) + frag_col),
                      pack_bf16(acc[4 * jn + 2 * r], acc[4 * jn + 2 * r + 1]));
    }
  };
  // Chunk i (of 8 per thread) of a warpgroup's 64 x 128 tile: 16 chunks of 16 bytes per row, so 16
  // threads cover one row's 256 contiguous bytes. Its global offset in tile j; -1 past the last row.
  auto chunk_offset = [&](int j, int i) -> int64_t {
    const int chunk_index = wg_tid + i * 128, row = chunk_index >> 4, chunk = chunk_index & 15;
    if (row >= wg_valid_rows) return -1;
    return (row0 + 64 * warpgroup + row) * p.hidden + j * kBlockN + chunk * 8;
  };
  // Backward: pre's chunks of the tile being computed, loaded one chunk per k-step (16-byte loads)
  // and used a tile later, when the tile drains.
  uint4 pre_chunk[8];
  auto load_pre_chunk = [&](int j, int i) {
    const int64_t offset = chunk_offset(j, i);
    pre_chunk[i] = offset >= 0 ? __ldg(reinterpret_cast<const uint4*>(p.pre + offset)) : uint4{};
  };
  // Chunk i of the staged tile j to global memory: the forward writes pre and post = act(pre), the
  // backward dpre = bf16(dpost · f'(pre)) — the element math of the separate passes (activation.cuh).
  const float slope_sq = p.slope * p.slope;
  auto drain_chunk = [&](int j, int i) {
    const int64_t offset = chunk_offset(j, i);
    if (offset < 0) return;
    const int chunk_index = wg_tid + i * 128, row = chunk_index >> 4, chunk = chunk_index & 15;
    const uint4 v = ld_shared_v4(staging_half(chunk >> 3).chunk_address(row, chunk & 7));
    const uint32_t* in = &v.x;
    uint4 result;
    uint32_t* out = &result.x;
    if constexpr (!kBackward) {
      *reinterpret_cast<uint4*>(p.out + offset) = v;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = unpack_bf16(in[e]);
        out[e] = pack_bf16(leaky_relu_sq_value(x.x, p.slope), leaky_relu_sq_value(x.y, p.slope));
      }
      *reinterpret_cast<uint4*>(p.post + offset) = result;
    } else {
      const uint32_t* pre = &pre_chunk[i].x;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 d = unpack_bf16(in[e]), x = unpack_bf16(pre[e]);
        out[e] = pack_bf16(leaky_relu_sq_gradient(d.x, x.x, slope_sq), leaky_relu_sq_gradient(d.y, x.y, slope_sq));
      }
      *reinterpret_cast<uint4*>(p.out + offset) = result;
    }
  };

  for (int s = 0; s < kAhead; ++s) {
    load_step(s);
    cp_async_commit();
  }
  float acc[64] = {};
  const uint32_t a_offset = warpgroup * 64 * 128;  // this warpgroup's 64 rows of an A slice
  for (int j = 0; j < tiles; ++j) {
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      const int s = j * kSteps + k;
      cp_async_wait<kAhead - 1>();  // this thread's copies of step s have landed
      fence_proxy_async_shared();   // ... visible to the tensor cores once every thread is past the barrier
      __syncthreads();              // (at k = 0 it also publishes the staged tile j - 1)
      if (s + kAhead < steps) load_step(s + kAhead);
      cp_async_commit();  // possibly empty: keeps one group per step for the wait above

      const uint32_t a_base = a_slice(k).base + a_offset, b_base = stage(s);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kStepK / 16; ++kk) {
        const uint64_t a_desc = swizzled_tile_descriptor(a_base + kk * 32);
        if constexpr (!kBackward)
          wgmma_m64n128k16_bf16_ss<0, 0>(acc, a_desc, swizzled_tile_descriptor(b_base + kk * 32), k > 0 || kk > 0);
        else
          wgmma_m64n128k16_bf16_ss<0, 1>(acc, a_desc, swizzled_tile_descriptor(b_base + kk * 2048, kHalfTileBytes),
                                         k > 0 || kk > 0);
      }
      wgmma_commit();
      // While the tensor cores run: one eighth of the previous tile's output goes out.
      if (j > 0) drain_chunk(j - 1, k);
      if constexpr (kBackward) load_pre_chunk(j, k);  // pre_chunk[k] of tile j - 1 is spent
      wgmma_wait<1>();
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
    warpgroup_barrier(warpgroup);  // the warpgroup has drained tile j - 1 from the staging tile
    stage_output(acc);
  }
  warpgroup_barrier(warpgroup);
#pragma unroll
  for (int i = 0; i < 8; ++i) drain_chunk(tiles - 1, i);
#else
  __trap();  // built without sm_90a (PGOLF_CUDA_ARCH): fail loudly rather than compute nothing
#endif
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <bool kBackward>
void launch(const MlpGemmParams& p, int dim, const char* what, cudaStream_t stream) {
  PG_CUDA_REQUIRE(mlp_fused_supported(dim, p.hidden), what);
  PG_CUDA_REQUIRE(aligned16(p.a) && aligned16(p.b) && aligned16(p.out) && aligned16(p.pre) && aligned16(p.post),
                  "mlp_fused: every matrix must be 16-byte aligned");
  if (p.rows == 0) return;
  static const bool configured = [] {
    PG_CUDA_CHECK(
        cudaFuncSetAttribute(mlp_fused_gemm_kernel<kBackward>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    return true;
  }();
  (void)configured;
  const int64_t blocks = (p.rows + kBlockM - 1) / kBlockM;
  mlp_fused_gemm_kernel<kBackward><<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool mlp_fused_supported(int dim, int hidden) {
  static const bool hopper = [] {
    if (device_count() == 0) return false;
    int device = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    const DeviceInfo info = device_info(device);
    return info.cc_major == 9 && info.cc_minor == 0;
  }();
  return hopper && dim == kDim && hidden > 0 && hidden % kBlockN == 0;
}

void mlp_fused_forward(const bf16* m, const bf16* wfc, bf16* pre, bf16* post, int64_t rows, int dim, int hidden,
                       float slope, cudaStream_t stream) {
  launch<false>(MlpGemmParams{m, wfc, nullptr, pre, post, rows, hidden, slope}, dim,
                "mlp_fused_forward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU", stream);
}

void mlp_fused_backward(const bf16* df, const bf16* wproj, const bf16* pre, bf16* dpre, int64_t rows, int dim,
                        int hidden, float slope, cudaStream_t stream) {
  launch<true>(MlpGemmParams{df, wproj, pre, dpre, nullptr, rows, hidden, slope}, dim,
               "mlp_fused_backward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU", stream);
}

}  // namespace pgolf::cuda
