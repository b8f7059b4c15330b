// Flash attention forward on Hopper with warp specialization (FlashAttention-3's scheme for head dim
// 64): the same arithmetic as the wgmma forward (attention_forward_wgmma.cu; online softmax in fp32,
// base-2 exponent, P·V with P from registers), fed differently.
//
// One block per (query tile of 192 rows, heads_per_block consecutive query heads): three consumer
// warpgroups of 64 query rows each and a producer warpgroup. The producer gives its registers up to
// the consumers (setmaxnreg: 24 against 160), and one of its threads streams the operands with TMA:
// the block's Q tiles (one per head), then for each head in turn the segment's K and V tiles of
// kBlockN keys up to the causal diagonal, each into a ring of kStages buffers with a `full` mbarrier
// (the copy's bytes landed) and an `empty` one (every consumer warp that reads the buffer is done with
// it). The 128-byte swizzle of the TMA boxes is the layout the wgmma descriptors expect (wgmma.cuh).
// There is no block-wide barrier after the start: each warpgroup waits only for the tiles it reads.
// One block fills a multiprocessor (registers), so a block starting or ending leaves it idle; the
// heads of a block (the same query tile, so the same work) share that cost, the next head's first
// tiles loading while the consumers finish the previous one.
//
// A consumer warpgroup computes S = Q·Kᵀ (64 x kBlockN, both operands from shared memory) and
// O += P·V (P from registers, V from shared memory), overlapping its softmax with the tensor cores
// as the wgmma forward does: step j issues S_j and then O += P_{j-1}·V_{j-1}, waits for S_j only, and
// exponentiates S_j while P_{j-1}·V_{j-1} still runs; O is rescaled by tile j's max correction once
// that product is done. The warpgroups run their steps independently. Measured slower on an H100
// (dense T = 2048, 128-key tiles): FlashAttention-3's turns to issue products passed around the
// warpgroups with named barriers (0.685 ms against 0.661), rescaling O just before the next product
// instead of after the softmax (0.683 against 0.662), two consumer warpgroups (0.77 to 0.90, whether
// one block a multiprocessor with 240 registers or a producer warp and 112 registers, which does not
// fit two blocks either: a sub-partition's 16384 registers hold 4 of the 9 warps, not 5).
//
// Query tiles are aligned to the segment's end: tile k holds rows [L - 192(k + 1), L - 192k) of a
// segment of L tokens, so that the partial tile (L not a multiple of 192) is the segment's first, the
// one with the fewest keys, and the long tiles keep all three warpgroups busy (aligned to the start,
// the partial tile would be the last, the longest). Rows before the segment (q_start < 0) are loaded
// from the previous segment (or as zeros before the first token), computed, and not written.
//
// Causality per warpgroup: warpgroup w (rows q_start + 64w..) computes the key tiles starting at or
// before its last row, tiles_of(w) of them; the last warpgroup computes all num_kv_tiles the producer
// loads and frees the tiles the others skip on their behalf (the `empty` barriers count arrivals, see
// release()). Rows are not aligned to key tiles, so a row may see no key of a tile its warpgroup
// computes (every key masked): the online softmax then leaves it unchanged (its running max is
// finite: every row of the segment sees key 0, in tile 0). Keys past the query tile's end are read
// from the segment (or the next one, or as zeros past the last token): masked to -inf like any key
// after the query (the tile crosses the diagonal), so P is exactly 0 and their V rows add nothing.
//
// Per consumer thread (warp w of the block, g = lane / 4, t = lane % 4): query rows 16w + g and
// 16w + g + 8 of the block tile; s[h][4j + e] holds key 64h + 8j + 2t + (e % 2) of row g + 8·(e / 2)
// (attention_forward_wgmma.cuh); o[4j + e] holds head dim 8j + 2t + (e % 2) of the same rows.
#include <climits>
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_forward_wgmma.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/tensor_map.h"
#include "backend/cuda/tma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

// Buffers of each of K and V: the producer runs up to two tiles ahead of the slowest reader. Three
// measured no faster on an H100 (dense T = 2048: 0.644 ms against 0.636-0.652; varlen 1..T: 0.511
// against 0.490-0.502).
constexpr int kStages = 2;
constexpr int kWarpgroups = 3;                  // consumer warpgroups
constexpr int kBlockM = 64 * kWarpgroups;        // query rows of a block
constexpr int kThreads = 128 * (kWarpgroups + 1);  // and the producer warpgroup
// Query heads a block computes one after the other (when H is even; else one): measured on an H100
// (dense T = 2048 / varlen 1..T, 128-key tiles, query tiles then aligned to the segment's start)
// 0.653-0.659 / 0.510-0.511 ms against 0.689 / 0.541 with one head and 0.679 / 0.510 with four.
constexpr int kMaxHeadsPerBlock = 2;
constexpr uint32_t kQBytes = kBlockM * 128;
// The block starts with 65536 / 512 = 128 registers a thread; the producer's 128 threads drop to 24
// and the consumers take what that frees (24·128 + 160·384 <= 65536). At 128 the consumers' products
// would be serialized (ptxas: insufficient registers for the wgmma pipeline).
constexpr int kProducerRegisters = 24, kConsumerRegisters = 160;

struct WsForwardParams {
  CUtensorMap q_map;  // q as [N, H·64]: boxes of kBlockM rows x 64 (a block's query tile)
  CUtensorMap k_map;  // k as [N, Hkv·64]: boxes of kBlockN rows x 64
  CUtensorMap v_map;  // v, like k
  AttentionForwardParams p;
  int heads_per_block;  // consecutive query heads a block computes, one after the other
};

// Shared memory: heads_per_block Q tiles, the K ring, the V ring (each start on a swizzle atom), then
// the barriers: q_full[kMaxHeadsPerBlock], k_full[kStages], k_empty[kStages], v_full[kStages],
// v_empty[kStages].
template <int kBlockN>
struct WsLayout {
  static constexpr uint32_t kTileBytes = kBlockN * 128;
  static constexpr uint32_t kRingBytes = 2 * kStages * kTileBytes;
  static constexpr uint32_t kBarrierBytes = (kMaxHeadsPerBlock + 4 * kStages) * 8;
  static constexpr int smem_bytes(int heads_per_block) {
    return heads_per_block * kQBytes + kRingBytes + kBarrierBytes + kSwizzleAtomBytes;
  }
};

template <int kBlockN>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_ws_kernel(const __grid_constant__ WsForwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Layout = WsLayout<kBlockN>;
  constexpr int kHalves = kBlockN / 64;
  constexpr uint32_t kTileBytes = Layout::kTileBytes;
  const AttentionForwardParams& p = params.p;
  const int heads = params.heads_per_block;
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2;
  const int head0 = blockIdx.y * heads;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockM);
  if (!seg.valid) return;
  // Query tiles are counted from the segment's end, tile 0 the last 192 rows (the most keys: scheduled
  // first); the first tile of the segment is the partial one, q_start < 0 (see the header).
  const int q_end = seg.length - seg.tile * kBlockM;  // segment-local, exclusive
  const int q_start = q_end - kBlockM;
  if (query_tile_skipped(p, seg, q_end)) return;
  const int num_kv_tiles = (q_end + kBlockN - 1) / kBlockN;  // keys any query of the tile sees: q_end
  // Key tiles warpgroup w computes: those starting at or before its last row (none when every row
  // lies before the segment). The last warpgroup computes them all.
  auto tiles_of = [&](int w) {
    const int last_row = q_start + 64 * w + 63;
    return last_row < 0 ? 0 : last_row / kBlockN + 1;
  };
  constexpr int last_warpgroup = kWarpgroups - 1;

  // K/V tiles are numbered through the block's heads: tile j of head head0 + i is g = i·num_kv_tiles + j,
  // in buffer g % kStages, whose barriers complete phase g / kStages for it.
  const uint32_t base = (smem_address(smem) + (kSwizzleAtomBytes - 1)) & ~uint32_t(kSwizzleAtomBytes - 1);
  auto q_tile = [&](int i) { return base + static_cast<uint32_t>(i) * kQBytes; };
  const uint32_t ring = base + static_cast<uint32_t>(heads) * kQBytes;
  auto k_tile = [&](int g) { return ring + static_cast<uint32_t>(g % kStages) * kTileBytes; };
  auto v_tile = [&](int g) { return ring + static_cast<uint32_t>(kStages + g % kStages) * kTileBytes; };
  const uint32_t barriers = ring + Layout::kRingBytes;
  auto q_full = [&](int i) { return barriers + static_cast<uint32_t>(i) * 8; };
  auto ring_barrier = [&](int kind, int g) {  // kind 0..3: k_full, k_empty, v_full, v_empty
    return barriers + static_cast<uint32_t>(kMaxHeadsPerBlock + kind * kStages + g % kStages) * 8;
  };
  auto k_full = [&](int g) { return ring_barrier(0, g); };
  auto k_empty = [&](int g) { return ring_barrier(1, g); };
  auto v_full = [&](int g) { return ring_barrier(2, g); };
  auto v_empty = [&](int g) { return ring_barrier(3, g); };
  auto phase = [](int g) { return static_cast<uint32_t>((g / kStages) & 1); };

  if (tid == 0) {
    for (int i = 0; i < heads; ++i) mbarrier_init(q_full(i), 1);
    for (int st = 0; st < kStages; ++st) {
      mbarrier_init(k_full(st), 1);
      mbarrier_init(v_full(st), 1);
      mbarrier_init(k_empty(st), 4 * kWarpgroups);  // one arrival per consumer warp (release())
      mbarrier_init(v_empty(st), 4 * kWarpgroups);
    }
    fence_mbarrier_init_cluster();
  }
  __syncthreads();  // the barriers exist before any copy or wait uses them

  if (warpgroup == kWarpgroups) {
    // Producer: every head's Q tile at once (each has its own buffer), then per head K_0, and per step
    // j K_{j+1} and V_j — the order the consumers need them (step j reads K_j and V_{j-1}). Tile g
    // reuses the buffer of tile g - kStages once every reader has released it, so the next head's
    // first tiles load while the consumers finish the previous head. The boxes are counted in full,
    // rows past the tensor's end included.
    setmaxnreg_dec<kProducerRegisters>();
    if (tid == kWarpgroups * 128) {
      const int token0 = seg.start;  // the segment's first key
      for (int i = 0; i < heads; ++i) {
        mbarrier_arrive_expect_tx(q_full(i), kQBytes);
        tma_load_2d(q_tile(i), &params.q_map, (head0 + i) * kHeadDim, token0 + q_start, q_full(i));
      }
      for (int i = 0; i < heads; ++i) {
        const int kv_column = (head0 + i) / p.group * kHeadDim;
        for (int j = 0; j <= num_kv_tiles; ++j) {
          if (j < num_kv_tiles) {
            const int g = i * num_kv_tiles + j;
            if (g >= kStages) mbarrier_wait(k_empty(g), phase(g) ^ 1);
            mbarrier_arrive_expect_tx(k_full(g), kTileBytes);
            tma_load_2d(k_tile(g), &params.k_map, kv_column, token0 + j * kBlockN, k_full(g));
          }
          if (j >= 1) {
            const int g = i * num_kv_tiles + j - 1;
            if (g >= kStages) mbarrier_wait(v_empty(g), phase(g) ^ 1);
            mbarrier_arrive_expect_tx(v_full(g), kTileBytes);
            tma_load_2d(v_tile(g), &params.v_map, kv_column, token0 + (j - 1) * kBlockN, v_full(g));
          }
        }
      }
    }
    return;
  }

  // Consumers.
  setmaxnreg_inc<kConsumerRegisters>();
  const int my_tiles = tiles_of(warpgroup);
  const int warp_row0 = q_start + warp * 16;  // segment-local first query of this warp

  // Releases the buffer of tile g (barrier `empty`; j: its index within the head) once this warp's
  // products reading it are done: every warp of each warpgroup that reads the tile arrives once, and
  // the warps of the last warpgroup (which reads every tile) also arrive for the warpgroups that skip
  // it, so that every phase counts 4·kWarpgroups arrivals.
  auto release = [&](uint32_t empty, int j) {
    if (lane == 0) {
      uint32_t count = 1;
      if (warpgroup == last_warpgroup) {
#pragma unroll
        for (int w = 0; w < kWarpgroups; ++w) count += tiles_of(w) > j ? 0 : 1;
      }
      mbarrier_arrive(empty, count);
    }
  };

  for (int i = 0; i < heads; ++i) {
    const int head = head0 + i, g0 = i * num_kv_tiles;
    const uint32_t q_base = q_tile(i) + static_cast<uint32_t>(warpgroup * 64 * 128);  // this warpgroup's 64 rows
    float s[kHalves][32];             // S_j, then P_j in fp32
    uint32_t p_frag[kHalves * 4][4];  // P_{j-1} in bf16, the A operand of O += P_{j-1}·V_{j-1}
    float o_acc[32] = {};
    float row_max[2] = {-INFINITY, -INFINITY};  // running max of scale·log2(e)·s
    float row_sum[2] = {0.f, 0.f};              // this thread's part of the running sum of exp2

    // S_j = Q K_jᵀ (tile g), four k-steps over dh, both operands K-major from their tiles (dh 16kk..
    // 32·kk bytes into each row); 128 keys are one m64n128 product (its accumulators are s[0], s[1]).
    auto issue_scores = [&](int g) {
      const uint32_t k_base = k_tile(g);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t a = k_major_step_descriptor(q_base, kk), b = k_major_step_descriptor(k_base, kk);
        if constexpr (kHalves == 2) wgmma_m64n128k16_bf16_ss<0, 0>(reinterpret_cast<float(&)[64]>(s), a, b, kk > 0);
        else if (kk == 0) wgmma_m64n64k16_bf16_ss<false, 0, 0>(s[0], a, b);
        else wgmma_m64n64k16_bf16_ss<true, 0, 0>(s[0], a, b);
      }
      wgmma_commit();
    };
    // O += P V of tile g; S_j masked and exponentiated (attention_forward_wgmma.cuh).
    auto issue_pv = [&](int g) { attention_detail::issue_pv<kHalves>(o_acc, p_frag, v_tile(g)); };
    auto softmax_scores = [&](int j, float (&correction)[2]) {
      attention_detail::softmax_scores<kHalves>(s, j * kBlockN, warp_row0, lane, row_max, row_sum, correction);
    };

    mbarrier_wait(q_full(i), 0);
    // Step j <= my_tiles computes S_j (j < my_tiles) and O += P_{j-1}·V_{j-1} (j > 0). Each branch
    // waits for every product it issues before it ends: a product in flight across diverging paths
    // would make the compiler serialize all of them.
    for (int j = 0; j <= my_tiles; ++j) {
      const int g = g0 + j;
      if (j == 0) {  // the first tile: O is still zero
        if (my_tiles == 0) break;  // rows past the segment's end
        float correction[2];
        mbarrier_wait(k_full(g), phase(g));
        wgmma_fence();
        issue_scores(g);
        wgmma_wait<0>();
        release(k_empty(g), j);
        softmax_scores(j, correction);
        pack_p(s, p_frag);
      } else if (j < my_tiles) {
        float correction[2];
        mbarrier_wait(k_full(g), phase(g));
        mbarrier_wait(v_full(g - 1), phase(g - 1));
        wgmma_fence();
        issue_scores(g);
        issue_pv(g - 1);
        wgmma_wait<1>();  // S_j is done; P_{j-1}·V_{j-1} may still run during the softmax
        release(k_empty(g), j);
        softmax_scores(j, correction);
        wgmma_wait<0>();
        wgmma_fence_operands(o_acc);
        release(v_empty(g - 1), j - 1);
#pragma unroll
        for (int e = 0; e < 32; ++e) o_acc[e] *= correction[(e >> 1) & 1];
        pack_p(s, p_frag);
      } else {  // the last product of this warpgroup
        mbarrier_wait(v_full(g - 1), phase(g - 1));
        wgmma_fence();
        issue_pv(g - 1);
        wgmma_wait<0>();
        wgmma_fence_operands(o_acc);
        release(v_empty(g - 1), j - 1);
      }
    }

    // Rows before the segment (its first tile, aligned to the segment's end, starts before it) stay unwritten.
    store_forward_rows(p, o_acc, row_sum, row_max, seg.start, head, warp_row0, 0, INT_MAX, lane);
  }
#else
  __trap();  // built without sm_90a (PGOLF_CUDA_ARCH): fail loudly rather than compute nothing
#endif
}

template <int kBlockN>
void launch(const AttentionForwardParams& p, const AttentionShape& shape, int heads_per_block, cudaStream_t stream) {
  using Layout = WsLayout<kBlockN>;
  constexpr auto kernel = attention_forward_ws_kernel<kBlockN>;
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Layout::smem_bytes(kMaxHeadsPerBlock)));
    return true;
  }();
  (void)configured;
  const uint64_t n = static_cast<uint64_t>(shape.total_tokens);
  WsForwardParams params;
  params.q_map = swizzled_tensor_map(p.q, static_cast<uint64_t>(p.q_row_stride), n, kBlockM);
  params.k_map = swizzled_tensor_map(p.k, static_cast<uint64_t>(p.kv_row_stride), n, kBlockN);
  params.v_map = swizzled_tensor_map(p.v, static_cast<uint64_t>(p.kv_row_stride), n, kBlockN);
  params.p = p;
  params.heads_per_block = heads_per_block;
  dim3 grid(segment_tile_grid(shape, kBlockM), shape.num_heads / heads_per_block);
  kernel<<<grid, kThreads, Layout::smem_bytes(heads_per_block), stream>>>(params);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

int64_t attention_forward_ws_blocks(const AttentionShape& shape) {
  const int heads_per_block = shape.num_heads % kMaxHeadsPerBlock == 0 ? kMaxHeadsPerBlock : 1;
  return static_cast<int64_t>(segment_tile_grid(shape, kBlockM)) * (shape.num_heads / heads_per_block);
}

void check_attention_forward_ws_tuning(int warps, int key_tile) {
  PG_CUDA_REQUIRE(warps == 12 && (key_tile == 64 || key_tile == 128),
                  "attention_forward: the warp-specialized kernel takes tuning.forward_warps 12 and "
                  "forward_key_tile 64 or 128");
}

void launch_attention_forward_ws(const AttentionForwardParams& p, const AttentionShape& shape, int warps,
                                 int key_tile, cudaStream_t stream) {
  check_attention_forward_ws_tuning(warps, key_tile);
  require_hopper("attention_forward: the warp-specialized wgmma kernel needs an sm_90 (Hopper) GPU");
  const int heads_per_block = shape.num_heads % kMaxHeadsPerBlock == 0 ? kMaxHeadsPerBlock : 1;
  if (key_tile == 64) launch<64>(p, shape, heads_per_block, stream);
  else launch<128>(p, shape, heads_per_block, stream);
}

}  // namespace pgolf::cuda::attention_detail
