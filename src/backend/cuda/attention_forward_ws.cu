// Flash attention forward on Hopper with warp specialization (FlashAttention-3's scheme for head dim
// 64): the same arithmetic as the wgmma forward (attention_forward_wgmma.cu; online softmax in fp32,
// base-2 exponent, P·V with P from registers), fed differently.
//
// One block per (query tile of 64·kWarpgroups rows, head): kWarpgroups consumer warpgroups of 64
// query rows each and one producer warpgroup. The producer gives up its registers (setmaxnreg: 24)
// to the consumers (160 with three, 240 with two), and one of its threads streams the operands with
// TMA: the Q tile once, then the segment's K and V tiles of kBlockN keys up to the causal diagonal,
// each into a ring of kStages buffers with a `full` mbarrier (the copy's bytes landed) and an
// `empty` one (every consumer warp that reads the buffer is done with it). The 128-byte swizzle of
// the TMA boxes is the layout the wgmma descriptors expect (wgmma.cuh). There is no block-wide
// barrier after the start: each warpgroup waits only for the tiles it reads.
//
// A consumer warpgroup computes S = Q·Kᵀ (64 x kBlockN, both operands from shared memory) and
// O += P·V (P from registers, V from shared memory), overlapping its softmax with the tensor cores
// as the wgmma forward does: step j issues S_j and then O += P_{j-1}·V_{j-1}, waits for S_j only, and
// exponentiates S_j while P_{j-1}·V_{j-1} still runs; O is rescaled by tile j's max correction once
// that product is done. With kScheduled, the warpgroups also take turns to issue their products
// (named barriers passed around a ring, FlashAttention-3's "warp scheduler barrier"): warpgroup w
// issues the products of its step j after warpgroup w - 1 has issued those of its step j, so the
// products of one warpgroup run back to back and its softmax overlaps the others' products instead
// of all warpgroups' products being interleaved.
//
// Causality per warpgroup: warpgroup w (rows r0 = q_start + 64w..) computes the key tiles starting at
// or before its last row, tiles_of(w) of them, the block's last warpgroup with rows in the segment all
// num_kv_tiles the producer loads. Rows and tiles are 64-aligned, so every row sees the first key of
// every tile its warpgroup computes. A warpgroup that computes fewer tiles (or none: rows past the
// segment's end) still takes its turns in the ring (empty steps), and the last warpgroup with rows
// frees the tiles it skips on its behalf (the `empty` barriers count arrivals, see release()).
//
// Keys past the segment's end are read from the next segment (or as zeros past the last token): S is
// masked to -inf there (they lie after every query of the segment, in tiles that cross the diagonal),
// so P is exactly 0 and their V rows add nothing. Query rows past the segment's end are computed from
// such rows too and not written.
//
// Per consumer thread (warp w of the block, g = lane / 4, t = lane % 4): query rows 16w + g and
// 16w + g + 8 of the block tile; s[h][4j + e] holds key 64h + 8j + 2t + (e % 2) of row g + 8·(e / 2)
// (attention_forward_wgmma.cuh); o[4j + e] holds head dim 8j + 2t + (e % 2) of the same rows.
#include <cmath>
#include <cstdlib>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_forward_wgmma.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/tensor_map.h"
#include "backend/cuda/tma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

// Buffers of each of K and V: the producer runs up to two tiles ahead of the slowest reader.
constexpr int kStages = 2;

struct WsForwardParams {
  CUtensorMap q_map;  // q as [N, H·64]: boxes of kBlockM rows x 64 (a block's query tile)
  CUtensorMap k_map;  // k as [N, Hkv·64]: boxes of kBlockN rows x 64
  CUtensorMap v_map;  // v, like k
  AttentionForwardParams p;
};

template <int kWarpgroups, int kBlockN>
struct WsShape {
  static constexpr int kBlockM = 64 * kWarpgroups;  // query rows of a block
  static constexpr int kThreads = 128 * (kWarpgroups + 1);
  static constexpr uint32_t kQBytes = kBlockM * 128, kTileBytes = kBlockN * 128;
  // Shared memory: Q, the K ring, the V ring (each start on a swizzle atom), then the barriers:
  // q_full, k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages].
  static constexpr uint32_t kKOffset = kQBytes, kVOffset = kKOffset + kStages * kTileBytes;
  static constexpr uint32_t kBarrierOffset = kVOffset + kStages * kTileBytes;
  static constexpr int kSmemBytes = kBarrierOffset + (1 + 4 * kStages) * 8 + kSwizzleAtomBytes;
  // Registers a thread after the split. The block starts with 65536 / kThreads (128 or 168, what
  // __launch_bounds__ gives one block a multiprocessor); the producer's 128 threads drop to 24 and
  // the consumers take what that frees: 24·128 + 160·384 and 24·128 + 240·256 are both <= 65536.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kWarpgroups == 3 ? 160 : 240;
  static_assert(kWarpgroups == 2 || kWarpgroups == 3, "two or three consumer warpgroups");
  static_assert(kBlockN == 64 || kBlockN == 128, "K/V tiles of 64 or 128 keys");
};

template <int kWarpgroups, int kBlockN, bool kScheduled>
__global__ void __launch_bounds__(WsShape<kWarpgroups, kBlockN>::kThreads, 1)
    attention_forward_ws_kernel(const __grid_constant__ WsForwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = WsShape<kWarpgroups, kBlockN>;
  constexpr int kBlockM = Shape::kBlockM, kHalves = kBlockN / 64;
  const AttentionForwardParams& p = params.p;
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
  // Key tiles warpgroup w computes (see the header); the last warpgroup with rows computes them all.
  auto tiles_of = [&](int w) {
    const int row0 = q_start + 64 * w;
    return row0 < seg.length ? min(num_kv_tiles, (row0 + 63) / kBlockN + 1) : 0;
  };
  const int last_warpgroup = min(kWarpgroups - 1, (q_rows - 1) / 64);

  const uint32_t base = (smem_address(smem) + (kSwizzleAtomBytes - 1)) & ~uint32_t(kSwizzleAtomBytes - 1);
  auto k_tile = [&](int j) { return base + Shape::kKOffset + static_cast<uint32_t>(j % kStages) * Shape::kTileBytes; };
  auto v_tile = [&](int j) { return base + Shape::kVOffset + static_cast<uint32_t>(j % kStages) * Shape::kTileBytes; };
  const uint32_t q_full = base + Shape::kBarrierOffset;
  auto k_full = [&](int j) { return q_full + static_cast<uint32_t>(1 + j % kStages) * 8; };
  auto k_empty = [&](int j) { return q_full + static_cast<uint32_t>(1 + kStages + j % kStages) * 8; };
  auto v_full = [&](int j) { return q_full + static_cast<uint32_t>(1 + 2 * kStages + j % kStages) * 8; };
  auto v_empty = [&](int j) { return q_full + static_cast<uint32_t>(1 + 3 * kStages + j % kStages) * 8; };
  auto phase = [](int j) { return static_cast<uint32_t>((j / kStages) & 1); };  // of tile j's use of its buffer

  if (tid == 0) {
    mbarrier_init(q_full, 1);
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
    // Producer. Copy order: Q, K_0, then per step j K_{j+1} and V_j — the order the consumers need
    // them (step j reads K_j and V_{j-1}). Tile j reuses the buffer of tile j - kStages once every
    // reader has released it. The boxes are counted in full, rows past the tensor's end included.
    setmaxnreg_dec<Shape::kProducerRegisters>();
    if (tid == kWarpgroups * 128) {
      const int token0 = seg.start;  // the segment's first key
      mbarrier_arrive_expect_tx(q_full, Shape::kQBytes);
      tma_load_2d(base, &params.q_map, head * kHeadDim, token0 + q_start, q_full);
      for (int j = 0; j <= num_kv_tiles; ++j) {
        if (j < num_kv_tiles) {
          if (j >= kStages) mbarrier_wait(k_empty(j), phase(j) ^ 1);
          mbarrier_arrive_expect_tx(k_full(j), Shape::kTileBytes);
          tma_load_2d(k_tile(j), &params.k_map, kv_head * kHeadDim, token0 + j * kBlockN, k_full(j));
        }
        if (j >= 1) {
          const int i = j - 1;
          if (i >= kStages) mbarrier_wait(v_empty(i), phase(i) ^ 1);
          mbarrier_arrive_expect_tx(v_full(i), Shape::kTileBytes);
          tma_load_2d(v_tile(i), &params.v_map, kv_head * kHeadDim, token0 + i * kBlockN, v_full(i));
        }
      }
    }
    return;
  }

  // Consumers.
  setmaxnreg_inc<Shape::kConsumerRegisters>();
  const int my_tiles = tiles_of(warpgroup);
  const int warp_row0 = q_start + warp * 16;  // segment-local first query of this warp
  const uint32_t q_tile = base + static_cast<uint32_t>(warpgroup * 64 * 128);  // this warpgroup's 64 rows

  // Releases the buffer of tile j (barrier `empty`) once this warp's products reading it are done:
  // every warp of each warpgroup that reads the tile arrives once, and the warps of the last
  // warpgroup (which reads every tile) also arrive for the warpgroups that skip it, so that every
  // phase counts 4·kWarpgroups arrivals.
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
  // The ring of turns (kScheduled): warpgroup w waits at barrier 1 + w for its own 128 threads and the
  // 128 of warpgroup w - 1 (which arrive once they have issued the same step), and passes the turn
  // on with an arrival at barrier 1 + (w + 1) % kWarpgroups. The last warpgroup hands the first
  // turn to warpgroup 0 and keeps its last one (nobody waits for it).
  auto take_turn = [&] {
    if constexpr (kScheduled) bar_sync(1 + warpgroup, 256);
  };
  auto pass_turn = [&](bool last_step) {
    if constexpr (kScheduled) {
      if (!last_step || warpgroup != kWarpgroups - 1) bar_arrive(1 + (warpgroup + 1) % kWarpgroups, 256);
    }
  };
  if (kScheduled && warpgroup == kWarpgroups - 1) bar_arrive(1, 256);

  float s[kHalves][32];             // S_j, then P_j in fp32
  uint32_t p_frag[kHalves * 4][4];  // P_{j-1} in bf16, the A operand of O += P_{j-1}·V_{j-1}
  float o_acc[32] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scale·log2(e)·s
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the running sum of exp2

  // S_j = Q K_jᵀ, four k-steps over dh, both operands K-major from their tiles (dh 16kk.. 32·kk
  // bytes into each row); 128 keys are one m64n128 product (its accumulators are s[0] then s[1]).
  auto issue_scores = [&](int j) {
    const uint32_t k_base = k_tile(j);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t a = k_major_step_descriptor(q_tile, kk), b = k_major_step_descriptor(k_base, kk);
      if constexpr (kHalves == 2) wgmma_m64n128k16_bf16_ss<0, 0>(reinterpret_cast<float(&)[64]>(s), a, b, kk > 0);
      else if (kk == 0) wgmma_m64n64k16_bf16_ss<false, 0, 0>(s[0], a, b);
      else wgmma_m64n64k16_bf16_ss<true, 0, 0>(s[0], a, b);
    }
    wgmma_commit();
  };
  // O += P_j V_j over kBlockN / 16 k-steps; V is the MN-major B operand (keys 16kk.. 2048·kk bytes on).
  auto issue_pv = [&](int j) {
    const uint32_t v_base = v_tile(j);
#pragma unroll
    for (int kk = 0; kk < kHalves * 4; ++kk)
      wgmma_m64n64k16_bf16<true, 1>(o_acc, p_frag[kk], mn_major_step_descriptor(v_base, kk));
    wgmma_commit();
  };
  // After S_j has landed: masked and exponentiated in place (P_j in fp32); `correction` as in online_softmax.
  auto softmax_scores = [&](int j, float (&correction)[2]) {
#pragma unroll
    for (int h = 0; h < kHalves; ++h) wgmma_fence_operands(s[h]);
    const int key0 = j * kBlockN;
    if (key0 + kBlockN - 1 > warp_row0) mask_causal(s, key0, warp_row0, lane);  // crosses the diagonal
    online_softmax(s, row_max, row_sum, correction);
  };

  mbarrier_wait(q_full, 0);
  // Step j <= num_kv_tiles computes S_j (j < my_tiles) and O += P_{j-1}·V_{j-1} (0 < j <= my_tiles),
  // the same steps in every warpgroup (the ring needs every turn taken). Each branch waits for every
  // product it issues before it ends: a product in flight across diverging paths would make the
  // compiler serialize all of them. A tile's `full` barrier is waited for before the turn, so that
  // the turn is not held while a copy lands.
  for (int j = 0; j <= num_kv_tiles; ++j) {
    const bool last_step = j == num_kv_tiles;
    if (j == 0 && my_tiles > 0) {  // the first tile: O is still zero
      float correction[2];
      mbarrier_wait(k_full(0), 0);
      take_turn();
      wgmma_fence();
      issue_scores(0);
      pass_turn(last_step);
      wgmma_wait<0>();
      release(k_empty(0), 0);
      softmax_scores(0, correction);
      pack_p(s, p_frag);
    } else if (j > 0 && j < my_tiles) {
      float correction[2];
      mbarrier_wait(k_full(j), phase(j));
      mbarrier_wait(v_full(j - 1), phase(j - 1));
      take_turn();
      wgmma_fence();
      issue_scores(j);
      issue_pv(j - 1);
      pass_turn(last_step);
      wgmma_wait<1>();  // S_j is done; P_{j-1}·V_{j-1} may still run during the softmax
      release(k_empty(j), j);
      softmax_scores(j, correction);
      wgmma_wait<0>();
      wgmma_fence_operands(o_acc);
      release(v_empty(j - 1), j - 1);
#pragma unroll
      for (int i = 0; i < 32; ++i) o_acc[i] *= correction[(i >> 1) & 1];
      pack_p(s, p_frag);
    } else if (j > 0 && j == my_tiles) {  // the last product of this warpgroup
      mbarrier_wait(v_full(j - 1), phase(j - 1));
      take_turn();
      wgmma_fence();
      issue_pv(j - 1);
      pass_turn(last_step);
      wgmma_wait<0>();
      wgmma_fence_operands(o_acc);
      release(v_empty(j - 1), j - 1);
    } else {  // nothing left to compute (or nothing at all): the turn only
      take_turn();
      pass_turn(last_step);
    }
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

template <int kWarpgroups, int kBlockN, bool kScheduled>
void launch(const AttentionForwardParams& p, const AttentionShape& shape, cudaStream_t stream) {
  using Shape = WsShape<kWarpgroups, kBlockN>;
  constexpr auto kernel = attention_forward_ws_kernel<kWarpgroups, kBlockN, kScheduled>;
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes));
    return true;
  }();
  (void)configured;
  const uint64_t n = static_cast<uint64_t>(shape.total_tokens);
  WsForwardParams params;
  params.q_map = swizzled_tensor_map(p.q, static_cast<uint64_t>(p.q_row_stride), n, Shape::kBlockM);
  params.k_map = swizzled_tensor_map(p.k, static_cast<uint64_t>(p.kv_row_stride), n, kBlockN);
  params.v_map = swizzled_tensor_map(p.v, static_cast<uint64_t>(p.kv_row_stride), n, kBlockN);
  params.p = p;
  dim3 grid(segment_tile_grid(shape, Shape::kBlockM), shape.num_heads);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(params);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_attention_forward_ws(const AttentionForwardParams& p, const AttentionShape& shape, int warps,
                                 int key_tile, cudaStream_t stream) {
  PG_CUDA_REQUIRE(warps == 8 || warps == 12,
                  "attention_forward: the warp-specialized kernel needs tuning.forward_warps 8 or 12");
  PG_CUDA_REQUIRE(key_tile == 64 || key_tile == 128, "attention_forward: tuning.forward_key_tile must be 64 or 128");
  require_hopper("attention_forward: the warp-specialized wgmma kernel needs an sm_90 (Hopper) GPU");
  static const bool scheduled = std::getenv("PGOLF_ATTN_WS_UNSCHEDULED") == nullptr;  // EXPERIMENT, remove
  if (scheduled) {
    if (warps == 8) {
      if (key_tile == 64) launch<2, 64, true>(p, shape, stream);
      else launch<2, 128, true>(p, shape, stream);
    } else {
      if (key_tile == 64) launch<3, 64, true>(p, shape, stream);
      else launch<3, 128, true>(p, shape, stream);
    }
  } else {
    if (warps == 8) launch<2, 128, false>(p, shape, stream);
    else launch<3, 128, false>(p, shape, stream);
  }
}

}  // namespace pgolf::cuda::attention_detail
