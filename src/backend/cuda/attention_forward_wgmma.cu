// Flash attention forward on Hopper's warpgroup MMA (wgmma, sm_90a). Same scheme as the mma.sync
// kernel (attention_forward.cu): one block per (query tile, head), the K/V tiles of the segment up to
// the causal diagonal double-buffered in shared memory by cp.async, online softmax in fp32 registers
// (base-2 exponent, scale folded in). What changes: each warpgroup (4 warps) owns 64 query rows and
// computes S = Q·Kᵀ (64 x kBlockN) and O += P·V (64 x 64) with wgmma.mma_async, A from registers (Q
// fragments loaded once by ldmatrix; P converted from the S accumulators), B read by the tensor cores
// straight from the 128-byte-swizzled K and V tiles through matrix descriptors (wgmma.cuh explains
// the layouts) instead of per-warp ldmatrix.
//
// Per thread (warp w of the block, g = lane / 4, t = lane % 4): query rows 16w + g and 16w + g + 8 of
// the block tile; s[h][4j + e] holds key 64h + 8j + 2t + (e % 2) of row g + 8·(e / 2); o[4j + e] holds
// head dim 8j + 2t + (e % 2) of the same rows.
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

constexpr int kSwizzleAtomBytes = 1024;  // tile starts must be aligned to this (wgmma.cuh)

template <int kWarpgroups, int kBlockN>
constexpr int wgmma_forward_smem_bytes() {
  // Q tile, then K and V tiles, two buffers each; rows of 128 bytes; room to align the start.
  return (64 * kWarpgroups + 4 * kBlockN) * 128 + kSwizzleAtomBytes;
}

// Blocks per multiprocessor the register budget is set for: one warpgroup needs about kBlockN / 2 (S)
// + 32 (O) + 16 (Q) + kBlockN / 4 (P) + addressing registers a thread; checked with -Xptxas -v.
template <int kWarpgroups, int kBlockN>
constexpr int wgmma_forward_min_blocks() {
  return kWarpgroups == 2 ? 1 : (kBlockN == 64 ? 3 : 2);
}

template <int kWarpgroups, int kBlockN>
__global__ void __launch_bounds__(kWarpgroups * 128, wgmma_forward_min_blocks<kWarpgroups, kBlockN>())
    attention_forward_wgmma_kernel(const AttentionForwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBlockM = 64 * kWarpgroups, kHalves = kBlockN / 64;
  constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2;
  const int head = blockIdx.y, kv_head = head / p.group;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockM);
  if (!seg.valid) return;
  // Within a segment the last query tiles have the most keys: schedule them first.
  const int num_q_tiles = (seg.length + kBlockM - 1) / kBlockM;
  const int q_start = (num_q_tiles - 1 - seg.tile) * kBlockM;  // segment-local
  const int q_rows = min(kBlockM, seg.length - q_start);
  const int kv_len = min(seg.length, q_start + kBlockM);  // keys any query of the tile sees
  const int num_kv_tiles = (kv_len + kBlockN - 1) / kBlockN;

  // Every tile starts on a swizzle atom: the Q tile (kBlockM rows) and each K/V tile (kBlockN rows)
  // are multiples of 8 rows of 128 bytes.
  const uint32_t smem_base = (smem_address(smem) + (kSwizzleAtomBytes - 1)) & ~uint32_t(kSwizzleAtomBytes - 1);
  const SwizzledTile64 q_tile{smem_base};
  const uint32_t kv_base = smem_base + kBlockM * 128;
  auto k_tile = [&](int buf) { return SwizzledTile64{kv_base + static_cast<uint32_t>(buf * 2 * kBlockN * 128)}; };
  auto v_tile = [&](int buf) { return SwizzledTile64{kv_base + static_cast<uint32_t>((buf * 2 + 1) * kBlockN * 128)}; };

  const __nv_bfloat16* k_src = p.k + static_cast<int64_t>(seg.start) * p.kv_row_stride + kv_head * kHeadDim;
  const __nv_bfloat16* v_src = p.v + static_cast<int64_t>(seg.start) * p.kv_row_stride + kv_head * kHeadDim;
  auto load_kv = [&](int tile, int buf) {
    const int64_t offset = static_cast<int64_t>(tile) * kBlockN * p.kv_row_stride;
    const int rows = kv_len - tile * kBlockN;  // keys past the segment are zero-filled
    k_tile(buf).template load_async<kBlockN, kThreads>(k_src + offset, p.kv_row_stride, rows, tid);
    v_tile(buf).template load_async<kBlockN, kThreads>(v_src + offset, p.kv_row_stride, rows, tid);
  };

  q_tile.load_async<kBlockM, kThreads>(
      p.q + static_cast<int64_t>(seg.start + q_start) * p.q_row_stride + head * kHeadDim, p.q_row_stride, q_rows,
      tid);
  load_kv(0, 0);
  cp_async_commit();

  const int warp_row0 = q_start + warp * 16;            // segment-local first query of this warp
  const int warpgroup_row0 = q_start + warpgroup * 64;  // ... and of its warpgroup
  // A warpgroup whose rows all lie past the segment end (short segments, 128-row tiles) has nothing
  // to compute; the condition is the same for its 4 warps, as wgmma requires.
  const bool warpgroup_has_rows = warpgroup_row0 < seg.length;
  uint32_t q_frag[4][4];  // A fragments of the warp's 16 rows, dh 16kk..16kk+15
  float o_acc[32] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scale·log2(e)·s
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the running sum of exp2

  for (int j = 0; j < num_kv_tiles; ++j) {
    if (j + 1 < num_kv_tiles) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();          // tile j (and Q) have landed for this thread's copies
    fence_proxy_async_shared();  // ... and are visible to the tensor cores' reads after the barrier
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) ldmatrix_x4(q_frag[kk], a_fragment_address(q_tile, warp * 16, kk * 16, lane));
    }
    const int key0 = j * kBlockN;
    // Rows and tiles are 64-aligned: a warpgroup that sees key0 at all sees it in every row, so no
    // row of a computed tile is entirely masked.
    if (warpgroup_has_rows && key0 <= warpgroup_row0 + 63) {
      const uint32_t k_base = k_tile(j & 1).base, v_base = v_tile(j & 1).base;
      // S = Q Kᵀ: for each 64-key half h, four k-steps over dh; K rows 64h.. start 8 atoms further,
      // dh 16kk.. 32·kk bytes into the row (wgmma.cuh).
      float s[kHalves][32];
      wgmma_fence();
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const uint32_t half_base = k_base + static_cast<uint32_t>(h * 64 * 128);
        wgmma_m64n64k16_bf16<false, 0>(s[h], q_frag[0], k_major_step_descriptor(half_base, 0));
#pragma unroll
        for (int kk = 1; kk < 4; ++kk)
          wgmma_m64n64k16_bf16<true, 0>(s[h], q_frag[kk], k_major_step_descriptor(half_base, kk));
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int h = 0; h < kHalves; ++h) wgmma_fence_operands(s[h]);

      if (key0 + kBlockN - 1 > warp_row0) {  // the tile crosses this warp's diagonal
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            const int key = key0 + h * 64 + (i >> 2) * 8 + 2 * (lane & 3) + (i & 1);
            const int row = warp_row0 + (lane >> 2) + ((i >> 1) & 1) * 8;
            if (key > row) s[h][i] = -INFINITY;
          }
        }
      }
      // Online softmax: new max, rescale the running sum and O, exponentiate in place. Row r of this
      // thread is element e = 2r, 2r + 1 of every group of four.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
#pragma unroll
          for (int jn = 0; jn < 8; ++jn) mx = fmaxf(mx, fmaxf(s[h][4 * jn + 2 * r], s[h][4 * jn + 2 * r + 1]) * kScaleLog2);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = mx == -INFINITY ? 0.f : mx;  // a row with no visible key yet stays empty
        const float correction = exp2_approx(row_max[r] - base);
        row_max[r] = mx;
        row_sum[r] *= correction;
#pragma unroll
        for (int jn = 0; jn < 8; ++jn) {
          o_acc[4 * jn + 2 * r] *= correction;
          o_acc[4 * jn + 2 * r + 1] *= correction;
        }
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
#pragma unroll
          for (int jn = 0; jn < 8; ++jn) {
            const float p0 = exp2_approx(fmaf(s[h][4 * jn + 2 * r], kScaleLog2, -base));
            const float p1 = exp2_approx(fmaf(s[h][4 * jn + 2 * r + 1], kScaleLog2, -base));
            s[h][4 * jn + 2 * r] = p0;
            s[h][4 * jn + 2 * r + 1] = p1;
            row_sum[r] += p0 + p1;
          }
        }
      }
      // O += P V over kBlockN / 16 k-steps. P's A fragment for keys 16kk..16kk+15 is the pair of
      // 8-key accumulator groups jn = 2kk, 2kk + 1 (within half kk / 4), rounded to bf16. V is the
      // MN-major B operand: keys 16kk.. start 2048·kk bytes into the tile.
      uint32_t p_frag[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const int h = kk / 4, lo = 8 * (kk % 4);  // group jn = 2 (kk % 4): keys 16kk + 2t, +1 (rows g, g+8)
        const int hi = lo + 4;                     // group jn + 1: keys 16kk + 8 + 2t, +1
        p_frag[kk][0] = pack_bf16(s[h][lo], s[h][lo + 1]);
        p_frag[kk][1] = pack_bf16(s[h][lo + 2], s[h][lo + 3]);
        p_frag[kk][2] = pack_bf16(s[h][hi], s[h][hi + 1]);
        p_frag[kk][3] = pack_bf16(s[h][hi + 2], s[h][hi + 3]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        wgmma_m64n64k16_bf16<true, 1>(o_acc, p_frag[kk], mn_major_step_descriptor(v_base, kk));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(o_acc);
    }
    __syncthreads();  // every warpgroup is done with buffer j & 1 before tile j + 2 is loaded into it
  }

  // O / l and LSE = ln(sum exp(scale·s)) = (max + log2(sum)) · ln 2.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = warp_row0 + (lane >> 2) + r * 8;
    if (row >= seg.length) continue;
    const float inv = 1.f / sum;
    const int64_t token = seg.start + row;
    __nv_bfloat16* dst = p.o + token * p.q_row_stride + head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int jn = 0; jn < 8; ++jn)
      *reinterpret_cast<uint32_t*>(dst + jn * 8) =
          pack_bf16(o_acc[4 * jn + 2 * r] * inv, o_acc[4 * jn + 2 * r + 1] * inv);
    if ((lane & 3) == 0)
      p.lse[static_cast<int64_t>(head) * p.total_tokens + token] = (row_max[r] + log2f(sum)) / kLog2e;
  }
#else
  __trap();  // built without sm_90a (PGOLF_CUDA_ARCH): fail loudly rather than compute nothing
#endif
}

template <int kWarpgroups, int kBlockN>
void launch(const AttentionForwardParams& p, const AttentionShape& shape, cudaStream_t stream) {
  constexpr int bytes = wgmma_forward_smem_bytes<kWarpgroups, kBlockN>();
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_wgmma_kernel<kWarpgroups, kBlockN>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  dim3 grid(segment_tile_grid(shape, 64 * kWarpgroups), shape.num_heads);
  attention_forward_wgmma_kernel<kWarpgroups, kBlockN><<<grid, kWarpgroups * 128, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

// 128 keys per K/V tile: the 64-key instantiation of this kernel gave wrong outputs on an H100
// (every attention test case, both block shapes), so it is not launched.
void launch_attention_forward_wgmma(const AttentionForwardParams& p, const AttentionShape& shape, int warps,
                                    cudaStream_t stream) {
  PG_CUDA_REQUIRE(warps == 4 || warps == 8, "attention_forward: tuning.forward_warps must be 4 or 8");
  require_hopper("attention_forward: the wgmma kernel needs an sm_90 (Hopper) GPU");
  if (warps == 4) launch<1, 128>(p, shape, stream);
  else launch<2, 128>(p, shape, stream);
}

}  // namespace pgolf::cuda::attention_detail
