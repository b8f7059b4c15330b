// Flash attention forward on Hopper's warpgroup MMA (wgmma, sm_90a). Same scheme as the mma.sync
// kernel (attention_forward.cu): one block per (query tile, head), the K/V tiles of the segment up to
// the causal diagonal double-buffered in shared memory by cp.async, online softmax in fp32 registers
// (base-2 exponent, scale folded in). What changes: each warpgroup (4 warps) owns 64 query rows and
// computes S = Q·Kᵀ (64 x kBlockN) and O += P·V (64 x 64) with wgmma.mma_async, A from registers (Q
// fragments loaded once by ldmatrix; P converted from the S accumulators), B read by the tensor cores
// straight from the 128-byte-swizzled K and V tiles through matrix descriptors (wgmma.cuh explains
// the layouts) instead of per-warp ldmatrix.
//
// The two products of a warpgroup overlap its softmax (wgmma is asynchronous): step j issues S_j =
// Q·K_jᵀ and then O += P_{j-1}·V_{j-1}, waits for S_j only, and exponentiates S_j while the tensor
// cores still run P_{j-1}·V_{j-1}; O is rescaled by tile j's max correction once that product is done.
// Step j therefore reads K_j and V_{j-1}, and loads K_{j+1} and V_j for the next step.
//
// Per thread (warp w of the block, g = lane / 4, t = lane % 4): query rows 16w + g and 16w + g + 8 of
// the block tile; s[h][4j + e] holds key 64h + 8j + 2t + (e % 2) of row g + 8·(e / 2); o[4j + e] holds
// head dim 8j + 2t + (e % 2) of the same rows.
#include <climits>
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_forward_wgmma.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

// Buffers of each of K and V. Copies are issued kStages - 1 steps ahead of their use; a third stage
// measured slower on an H100 at every block shape (the copies are not what the kernel waits for).
constexpr int kStages = 2;

template <int kWarpgroups, int kBlockN>
constexpr int wgmma_forward_smem_bytes() {
  // Q tile, then K and V tiles, kStages buffers each; rows of 128 bytes; room to align the start.
  return (64 * kWarpgroups + 2 * kStages * kBlockN) * 128 + kSwizzleAtomBytes;
}

// Blocks per multiprocessor the register budget is set for: one warpgroup keeps S (kBlockN / 2), the
// previous tile's P (kBlockN / 4), O (32) and Q (16) registers a thread, plus addressing. With 64-key
// tiles that fits 128 registers (4 blocks of one warpgroup or 2 of two; 135 unbounded, no spills at
// 128: -Xptxas -v); 128-key tiles need about 190.
template <int kWarpgroups, int kBlockN>
constexpr int wgmma_forward_min_blocks() {
  return (kBlockN == 64 ? 4 : 2) / kWarpgroups;
}

template <int kWarpgroups, int kBlockN>
__global__ void __launch_bounds__(kWarpgroups * 128, wgmma_forward_min_blocks<kWarpgroups, kBlockN>())
    attention_forward_wgmma_kernel(const AttentionForwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBlockM = 64 * kWarpgroups, kHalves = kBlockN / 64;
  static_assert(kBlockN == 64 || kBlockN == 128, "K/V tiles of 64 or 128 keys");
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2;
  const int head = blockIdx.y, kv_head = head / p.group;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockM);
  if (!seg.valid) return;
  // Within a segment the last query tiles have the most keys: schedule them first.
  const int num_q_tiles = (seg.length + kBlockM - 1) / kBlockM;
  const int q_start = (num_q_tiles - 1 - seg.tile) * kBlockM;  // segment-local
  const int q_rows = min(kBlockM, seg.length - q_start);
  if (query_tile_skipped(p, seg, q_start + q_rows)) return;
  const int kv_len = min(seg.length, q_start + kBlockM);  // keys any query of the tile sees
  const int num_kv_tiles = (kv_len + kBlockN - 1) / kBlockN;

  // Every tile starts on a swizzle atom: the Q tile (kBlockM rows) and each K/V tile (kBlockN rows)
  // are multiples of 8 rows of 128 bytes. Layout: Q, K buffers 0 and 1, V buffers 0 and 1.
  const uint32_t smem_base = (smem_address(smem) + (kSwizzleAtomBytes - 1)) & ~uint32_t(kSwizzleAtomBytes - 1);
  const SwizzledTile64 q_tile{smem_base};
  const uint32_t kv_base = smem_base + kBlockM * 128;
  auto k_tile = [&](int tile) {
    return SwizzledTile64{kv_base + static_cast<uint32_t>((tile % kStages) * kBlockN * 128)};
  };
  auto v_tile = [&](int tile) {
    return SwizzledTile64{kv_base + static_cast<uint32_t>((kStages + tile % kStages) * kBlockN * 128)};
  };

  const int64_t kv_offset = static_cast<int64_t>(seg.start) * p.kv_row_stride + kv_head * kHeadDim;
  // Copies rows of tile `tile` of K or V (src) into `dst`; keys past the segment are zero-filled.
  auto load_tile = [&](const SwizzledTile64& dst, const __nv_bfloat16* src, int tile) {
    dst.template load_async<kBlockN, kThreads>(src + kv_offset + static_cast<int64_t>(tile) * kBlockN * p.kv_row_stride,
                                               p.kv_row_stride, kv_len - tile * kBlockN, tid);
  };

  q_tile.load_async<kBlockM, kThreads>(
      p.q + static_cast<int64_t>(seg.start + q_start) * p.q_row_stride + head * kHeadDim, p.q_row_stride, q_rows,
      tid);
  // Copy group g (g = j + kStages - 1 is issued at step j, the first kStages - 1 before the loop):
  // K_g and V_{g-1}, the operands of step g.
  auto load_group = [&](int g) {
    if (g < num_kv_tiles) load_tile(k_tile(g), p.k, g);
    if (g >= 1 && g - 1 < num_kv_tiles) load_tile(v_tile(g - 1), p.v, g - 1);
    cp_async_commit();
  };
#pragma unroll
  for (int g = 0; g < kStages - 1; ++g) load_group(g);

  const int warp_row0 = q_start + warp * 16;            // segment-local first query of this warp
  const int warpgroup_row0 = q_start + warpgroup * 64;  // ... and of its warpgroup
  // The key tiles this warpgroup computes: those starting at or before its last row. Rows and tiles
  // are 64-aligned, so a warpgroup that sees key0 at all sees it in every row and no row of a computed
  // tile is entirely masked. A warpgroup whose rows all lie past the segment end (short segments,
  // 128-row tiles) computes none. Uniform over the warpgroup's 4 warps, as wgmma requires.
  const int warpgroup_tiles =
      warpgroup_row0 < seg.length ? min(num_kv_tiles, (warpgroup_row0 + 63) / kBlockN + 1) : 0;
  uint32_t q_frag[4][4];  // A fragments of the warp's 16 rows, dh 16kk..16kk+15
  float s[kHalves][32];   // S_j, then P_j in fp32
  uint32_t p_frag[kHalves * 4][4];  // P_{j-1} in bf16, the A operand of O += P_{j-1}·V_{j-1}
  float o_acc[32] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scale·log2(e)·s
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the running sum of exp2

  // S_j = Q K_jᵀ: for each 64-key half h, four k-steps over dh; K rows 64h.. start 8 atoms further,
  // dh 16kk.. 32·kk bytes into the row (wgmma.cuh).
  auto issue_scores = [&](int j) {
    const uint32_t k_base = k_tile(j).base;
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const uint32_t half_base = k_base + static_cast<uint32_t>(h * 64 * 128);
      wgmma_m64n64k16_bf16<false, 0>(s[h], q_frag[0], k_major_step_descriptor(half_base, 0));
#pragma unroll
      for (int kk = 1; kk < 4; ++kk)
        wgmma_m64n64k16_bf16<true, 0>(s[h], q_frag[kk], k_major_step_descriptor(half_base, kk));
    }
    wgmma_commit();
  };
  // O += P_j V_j; S_j masked and exponentiated (attention_forward_wgmma.cuh).
  auto issue_pv = [&](int j) { attention_detail::issue_pv<kHalves>(o_acc, p_frag, v_tile(j).base); };
  auto softmax_scores = [&](int j, float (&correction)[2]) {
    attention_detail::softmax_scores<kHalves>(s, j * kBlockN, warp_row0, lane, row_max, row_sum, correction);
  };

  // Step j <= num_kv_tiles computes S_j (j < warpgroup_tiles) and O += P_{j-1}·V_{j-1} (0 < j <=
  // warpgroup_tiles). Each branch below waits for every product it issues before it ends: a product
  // in flight across diverging paths would make the compiler serialize all of them.
  for (int j = 0; j <= num_kv_tiles; ++j) {
    cp_async_wait<kStages - 2>();  // group j (K_j, V_{j-1}; Q with group 0) has landed for this thread
    fence_proxy_async_shared();    // ... and is visible to the tensor cores' reads after the barrier
    // Every copy of group j has landed, and every warpgroup has finished step j - 1, whose reads
    // (K_{j-1}, V_{j-2}) were the last of the buffers that group j + kStages - 1 refills.
    __syncthreads();
    load_group(j + kStages - 1);
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) ldmatrix_x4(q_frag[kk], a_fragment_address(q_tile, warp * 16, kk * 16, lane));
      if (warpgroup_tiles > 0) {  // the first tile: O is still zero
        float correction[2];
        wgmma_fence();
        issue_scores(0);
        wgmma_wait<0>();
        softmax_scores(0, correction);
        pack_p(s, p_frag);
      }
    } else if (j < warpgroup_tiles) {
      float correction[2];
      wgmma_fence();
      issue_scores(j);
      issue_pv(j - 1);
      wgmma_wait<1>();  // S_j is done; P_{j-1}·V_{j-1} may still run during the softmax
      softmax_scores(j, correction);
      wgmma_wait<0>();
      wgmma_fence_operands(o_acc);
#pragma unroll
      for (int i = 0; i < 32; ++i) o_acc[i] *= correction[(i >> 1) & 1];
      pack_p(s, p_frag);
    } else if (j == warpgroup_tiles) {  // the last product of this warpgroup
      wgmma_fence();
      issue_pv(j - 1);
      wgmma_wait<0>();
      wgmma_fence_operands(o_acc);
    }
  }

  // Rows past the segment (the last tile's) stay unwritten.
  store_forward_rows(p, o_acc, row_sum, row_max, seg.start, head, warp_row0, INT_MIN, seg.length, lane);
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
  attention_forward_wgmma_kernel<kWarpgroups, kBlockN>
      <<<grid, kWarpgroups * 128, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

// The kernel this one replaced (no overlap, two barriers a step) gave wrong outputs with 64-key
// tiles on an H100 (an LSE short of the reference by up to 2: keys left out); this one passes every
// attention test at both tiles and both block shapes.
void launch_attention_forward_wgmma(const AttentionForwardParams& p, const AttentionShape& shape, int warps,
                                    int key_tile, cudaStream_t stream) {
  PG_CUDA_REQUIRE(warps == 4 || warps == 8, "attention_forward: tuning.forward_warps must be 4 or 8");
  PG_CUDA_REQUIRE(key_tile == 64 || key_tile == 128, "attention_forward: tuning.forward_key_tile must be 64 or 128");
  require_hopper("attention_forward: the wgmma kernel needs an sm_90 (Hopper) GPU");
  if (warps == 4) {
    if (key_tile == 64) launch<1, 64>(p, shape, stream);
    else launch<1, 128>(p, shape, stream);
  } else {
    if (key_tile == 64) launch<2, 64>(p, shape, stream);
    else launch<2, 128>(p, shape, stream);
  }
}

}  // namespace pgolf::cuda::attention_detail
