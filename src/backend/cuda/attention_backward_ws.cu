// Flash attention backward main kernel on Hopper with warp specialization: the products and
// semantics of the three-warpgroup wgmma kernel (attention_backward_wgmma.cu: 192 keys a block, dK and
// dV summed in the same order: the tests' errors of the two agree in every printed digit), fed,
// synchronized and ordered differently. On an H100 (bench_cuda, s691's
// shape N = 98304, H 8, Hkv 4; the whole backward with its prepare and finish kernels) 1.651 ms
// against 1.856 at dense T = 2048 (312 against 278 TFLOP/s) and 1.296 against 1.421 on documents of
// random length; pgolf bench s691 77.6 against 80.2-80.5 ms a step.
//
// The wgmma kernel's warpgroups meet at a block barrier every query tile (the cp.async copies of the
// tile are shared, and so is the sum of their dQ parts), so that all three run the same phase at once:
// their Sᵀ/dPᵀ products together, then their exponentials together (the tensor cores idle), then the
// dQ sum and its atomics. Here a producer warpgroup streams each query tile's Q and dO (one thread:
// TMA boxes in the 128-byte swizzle of the wgmma descriptors) and its LSE and D (one warp: plain
// loads, zero past the segment as in the wgmma kernel) into a ring of kStages buffers, with a `full`
// mbarrier (the bytes landed and the statistics are stored) and an `empty` one (each consumer warp is
// done with the buffer), and gives its registers to the three consumer warpgroups (setmaxnreg).
// No block barrier follows the start: each warpgroup waits only for what it reads, and they drift
// apart, one's exponentials overlapping another's products.
//
// dQ: no fp32 parts in shared memory. Each warpgroup stores its dSᵀ rows (bf16) into a tile of all
// 192 keys (kDsStages of them, a `full` mbarrier counting the 12 consumer warps, an `empty` one the
// four warps that read it); query tile i's dQ = dS · K over all 192 keys (12 k-steps) is computed by
// warpgroup i % 3 at the start of its next tile (by then the others have usually written their rows)
// and added to the fp32 accumulator with float4 atomics from its registers, one per (query, 4 dh) as
// before. The tensor work is the same (12 k-steps a tile either way); the wgmma kernel's 48 KB of
// fp32 part stores and 48 KB of loads per tile, and the sum, are gone.
//
// Block order: the flat segment-major one (block_work without a work list: a segment's key tiles of
// one KV head run side by side), not the wgmma kernel's longest-first list. Under that list the
// blocks in flight belong to some 130 different (segment, KV head) pairs, whose fp32 dQ rows (201 MB
// in all at s691's shape) and Q, dO streams miss the 50 MB L2: ncu measured DRAM at 74 % of peak
// (4.3 GB a call) and an L2 hit rate of 32 %, and with it this kernel took 1.999 ms, slower than the
// wgmma kernel. Segment-major: 1.651 ms (ncu, with the tiles walked from the segment's end, which is
// otherwise no faster: L2 hits 81 %, DRAM 15 %). (The wgmma kernel, bound by its
// warpgroups running in step, gains nothing from the order: 1.901 ms against 1.856.)
//
// A warpgroup whose keys all follow the tile's last query (the later ones on a block's first tiles)
// computes nothing for it but still takes part in the barriers, and stores zero dSᵀ rows. Rows past
// the segment are read by TMA from the next segment (or as zeros past the last token), not zero-filled:
// their queries and keys are masked (Pᵀ = 0, so dSᵀ = 0 and they add nothing to dK, dV or dQ) and
// their values are finite, so the bits are those of the wgmma kernel.
#include "backend/cuda/attention_backward_wgmma.cuh"
#include "backend/cuda/tensor_map.h"
#include "backend/cuda/tma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

constexpr int kConsumers = 3;                     // consumer warpgroups of 64 keys
constexpr int kBlockN = 64 * kConsumers;          // keys of a block
constexpr int kThreads = 128 * (kConsumers + 1);  // and the producer warpgroup
constexpr int kStages = 3;                        // query tiles in flight (Q, dO, LSE, D)
constexpr int kDsStages = 3;                      // dSᵀ tiles of 192 keys
// The block starts with 65536 / 512 = 128 registers a thread; the producer drops to 24 and the
// consumers take what that frees (24·128 + 160·384 <= 65536).
constexpr int kProducerRegisters = 24, kConsumerRegisters = 160;

struct WsBackwardParams {
  CUtensorMap q_map, do_map;       // q, d_o as [N, H·64]: boxes of 64 rows x 64
  CUtensorMap k_map, v_map;        // k, v as [N, Hkv·64]: boxes of kBlockN rows x 64
  AttentionBackwardParams p;
};

// Shared memory (byte offsets from a swizzle-atom-aligned base): K and V of the block's keys, the dSᵀ
// tiles, the query ring (stage s: Q, then dO), the statistics ring (stage s: LSE, then D of 64
// queries), then the barriers kv_full, q_full[kStages], q_empty[kStages], ds_full[kDsStages],
// ds_empty[kDsStages].
struct WsLayout {
  static constexpr uint32_t kKeyBytes = kBlockN * 128;  // K, V or one dSᵀ tile
  static constexpr uint32_t kStatBytes = kQueryTile * 4;
  static constexpr uint32_t kK = 0, kV = kKeyBytes, kDs = 2 * kKeyBytes;
  static constexpr uint32_t kRing = kDs + kDsStages * kKeyBytes;
  static constexpr uint32_t kStats = kRing + kStages * 2 * kTileBytes;
  static constexpr uint32_t kBarriers = kStats + kStages * 2 * kStatBytes;
  static constexpr uint32_t kBytes = kBarriers + (1 + 2 * kStages + 2 * kDsStages) * 8 + kSwizzleAtomBytes;
  static constexpr uint32_t kStageBytes = 2 * kTileBytes;  // the TMA bytes of a query tile
};

__global__ void __launch_bounds__(kThreads, 1) attention_backward_ws_kernel(const __grid_constant__ WsBackwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = WsLayout;
  const AttentionBackwardParams& p = params.p;
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2, wg_warp = warp & 3;
  const BlockWork work = block_work(p, kBlockN);
  const int kv_head = work.kv_head;
  const SegmentTile seg = work.seg;
  if (!seg.valid) return;
  const int key_start = seg.tile * kBlockN;  // segment-local, a multiple of kQueryTile
  const int head_end = (kv_head + 1) * p.group;  // the walk ends at this query head
  const QueryTile first_tile{kv_head * p.group, key_start};

  // Query tile i of the walk uses ring stage i % kStages and dSᵀ tile i % kDsStages; their barriers
  // complete phase i / stages for it.
  const uint32_t base = (smem_address(smem) + (kSwizzleAtomBytes - 1)) & ~uint32_t(kSwizzleAtomBytes - 1);
  unsigned char* const aligned = smem + (base - smem_address(smem));
  auto q_tile = [&](int i) { return base + L::kRing + static_cast<uint32_t>(i % kStages) * 2 * kTileBytes; };
  auto do_tile = [&](int i) { return q_tile(i) + kTileBytes; };
  auto lse_offset = [&](int i) { return L::kStats + static_cast<uint32_t>(i % kStages) * 2 * L::kStatBytes; };
  auto ds_tile = [&](int i) { return base + L::kDs + static_cast<uint32_t>(i % kDsStages) * L::kKeyBytes; };
  const uint32_t kv_full = base + L::kBarriers;
  auto q_full = [&](int i) { return kv_full + 8 * (1 + i % kStages); };
  auto q_empty = [&](int i) { return kv_full + 8 * (1 + kStages + i % kStages); };
  auto ds_full = [&](int i) { return kv_full + 8 * (1 + 2 * kStages + i % kDsStages); };
  auto ds_empty = [&](int i) { return kv_full + 8 * (1 + 2 * kStages + kDsStages + i % kDsStages); };
  auto phase = [](int i, int stages) { return static_cast<uint32_t>((i / stages) & 1); };

  if (tid == 0) {
    mbarrier_init(kv_full, 1);
    for (int st = 0; st < kStages; ++st) {
      mbarrier_init(q_full(st), 1 + 32);  // the TMA thread and the statistics warp's lanes
      mbarrier_init(q_empty(st), 4 * kConsumers);  // every consumer warp
    }
    for (int st = 0; st < kDsStages; ++st) {
      mbarrier_init(ds_full(st), 4 * kConsumers);  // every consumer warp has stored its rows
      mbarrier_init(ds_empty(st), 4);              // the warps of the warpgroup computing the tile's dQ
    }
    fence_mbarrier_init_cluster();
  }
  __syncthreads();  // the barriers exist before any copy or wait uses them

  if (warpgroup == kConsumers) {
    // Producer: K and V once, then the walk's query tiles, tile i into the stage of tile i - kStages
    // once every consumer warp has released it. The boxes are counted in full, rows past the tensor's
    // end included.
    setmaxnreg_dec<kProducerRegisters>();
    const int producer_warp = warp - 4 * kConsumers;
    if (producer_warp == 1) {  // LSE and D of the tile's 64 queries, two of each a lane
      int i = 0;
      for (QueryTile t = first_tile; t.head < head_end; t = next_query_tile(t, key_start, seg.length), ++i) {
        if (i >= kStages) mbarrier_wait(q_empty(i), phase(i, kStages) ^ 1);
        float* const lse_s = reinterpret_cast<float*>(aligned + lse_offset(i));
        const int rows = seg.length - t.q_start;  // rows from `rows` on are past the segment: zeros
        const int64_t stat = static_cast<int64_t>(t.head) * p.total_tokens + seg.start + t.q_start;
#pragma unroll
        for (int r = lane; r < kQueryTile; r += 32) {
          lse_s[r] = r < rows ? p.lse[stat + r] : 0.f;
          lse_s[kQueryTile + r] = r < rows ? p.delta[stat + r] : 0.f;
        }
        mbarrier_arrive(q_full(i));
      }
    }
    if (tid == kConsumers * 128) {
      mbarrier_arrive_expect_tx(kv_full, 2 * L::kKeyBytes);
      tma_load_2d(base + L::kK, &params.k_map, kv_head * kHeadDim, seg.start + key_start, kv_full);
      tma_load_2d(base + L::kV, &params.v_map, kv_head * kHeadDim, seg.start + key_start, kv_full);
      int i = 0;
      for (QueryTile t = first_tile; t.head < head_end; t = next_query_tile(t, key_start, seg.length), ++i) {
        if (i >= kStages) mbarrier_wait(q_empty(i), phase(i, kStages) ^ 1);
        mbarrier_arrive_expect_tx(q_full(i), L::kStageBytes);
        const int row = seg.start + t.q_start;
        tma_load_2d(q_tile(i), &params.q_map, t.head * kHeadDim, row, q_full(i));
        tma_load_2d(do_tile(i), &params.do_map, t.head * kHeadDim, row, q_full(i));
      }
    }
    return;
  }

  // Consumers: warpgroup w owns keys 64w.. of the block (rows 64w.. of the K, V and dSᵀ tiles).
  setmaxnreg_inc<kConsumerRegisters>();
  const uint32_t wg_row_offset = static_cast<uint32_t>(warpgroup * kTileBytes);
  const uint64_t k_desc = swizzled_tile_descriptor(base + L::kK + wg_row_offset);
  const uint64_t v_desc = swizzled_tile_descriptor(base + L::kV + wg_row_offset);
  const int wg_key0 = key_start + warpgroup * 64;  // segment-local first key of the warpgroup
  const int thread_key0 = wg_key0 + wg_warp * 16 + (lane >> 2);  // key of accumulator rows e < 2
  float dk_acc[32] = {}, dv_acc[32] = {};

  // dSᵀ of tile i → this warpgroup's rows of its dSᵀ tile, once the dQ of tile i - kDsStages (which
  // read that tile) is done; each thread's stores are made visible to the tensor cores before its
  // warp's arrival.
  auto publish_ds = [&](int i, const uint32_t (&ds_frag)[4][4]) {
    if (i >= kDsStages) mbarrier_wait(ds_empty(i), phase(i, kDsStages) ^ 1);
    store_ds_rows(SwizzledTile64{ds_tile(i) + wg_row_offset}, ds_frag, wg_warp, lane);
    fence_proxy_async_shared();
    __syncwarp();
    if (lane == 0) mbarrier_arrive(ds_full(i));
  };
  // dQ of query tile i (tile t) over the block's 192 keys, added to the accumulator.
  auto tile_dq = [&](int i, QueryTile t) {
    mbarrier_wait(ds_full(i), phase(i, kDsStages));
    float dq[32];
    issue_dq<kBlockN / 16>(dq, swizzled_tile_descriptor(ds_tile(i)), swizzled_tile_descriptor(base + L::kK));
    wgmma_wait<0>();
    wgmma_fence_operands(dq);
    if (lane == 0) mbarrier_arrive(ds_empty(i));
    const int row0 = t.q_start + wg_warp * 16;  // segment-local first query of this warp's rows
    add_dq_rows(p, dq, seg.start + row0, seg.length - row0, t.head, lane);
  };

  mbarrier_wait(kv_full, 0);
  int i = 0;
  QueryTile previous = first_tile;
  for (QueryTile t = first_tile; t.head < head_end; previous = t, t = next_query_tile(t, key_start, seg.length), ++i) {
    if (i > 0 && (i - 1) % kConsumers == warpgroup) tile_dq(i - 1, previous);
    mbarrier_wait(q_full(i), phase(i, kStages));
    uint32_t ds_frag[4][4];
    if (wg_key0 <= t.q_start + kQueryTile - 1) {  // some query of the tile sees a key of this warpgroup
      const float* lse_s = reinterpret_cast<const float*>(aligned + lse_offset(i));
      key_tile_products<false>({k_desc, v_desc, swizzled_tile_descriptor(q_tile(i)), swizzled_tile_descriptor(do_tile(i)),
                         lse_s, lse_s + kQueryTile, wg_key0, thread_key0},
                        t.q_start, seg.length, lane, dk_acc, dv_acc, ds_frag);
      publish_ds(i, ds_frag);
      wgmma_wait<0>();  // dV and dK: the stage's Q and dO are read
      wgmma_fence_operands(dk_acc);
      wgmma_fence_operands(dv_acc);
    } else {
#pragma unroll
      for (int kq = 0; kq < 4; ++kq) ds_frag[kq][0] = ds_frag[kq][1] = ds_frag[kq][2] = ds_frag[kq][3] = 0u;
      publish_ds(i, ds_frag);
    }
    if (lane == 0) mbarrier_arrive(q_empty(i));
  }
  if (i > 0 && (i - 1) % kConsumers == warpgroup) tile_dq(i - 1, previous);
  store_dk_dv(p, dk_acc, dv_acc, seg, kv_head, thread_key0, lane);
#else
  __trap();  // built without sm_90a (PGOLF_CUDA_ARCH): fail loudly rather than compute nothing
#endif
}

}  // namespace

int attention_backward_ws_schedule_keys(int warps) {
  PG_CUDA_REQUIRE(warps == 12,
                  "attention_backward: the warp-specialized kernel takes tuning.backward_warps 12 (three consumer "
                  "warpgroups and a producer)");
  return 0;  // no work list: the segment-major block order (see the top of this file)
}

void launch_attention_backward_ws(const AttentionBackwardParams& p, const AttentionShape& shape, int warps,
                                  cudaStream_t stream) {
  attention_backward_ws_schedule_keys(warps);  // checks `warps`
  require_hopper("attention_backward: the warp-specialized wgmma kernel needs an sm_90 (Hopper) GPU");
  const uint64_t n = static_cast<uint64_t>(shape.total_tokens);
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_ws_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       WsLayout::kBytes));
    return true;
  }();
  (void)configured;
  WsBackwardParams params;
  params.q_map = swizzled_tensor_map(p.q, static_cast<uint64_t>(p.q_row_stride), n, kQueryTile);
  params.do_map = swizzled_tensor_map(p.d_o, static_cast<uint64_t>(p.q_row_stride), n, kQueryTile);
  params.k_map = swizzled_tensor_map(p.k, static_cast<uint64_t>(p.kv_row_stride), n, kBlockN);
  params.v_map = swizzled_tensor_map(p.v, static_cast<uint64_t>(p.kv_row_stride), n, kBlockN);
  params.p = p;
  const int64_t blocks = static_cast<int64_t>(segment_tile_grid(shape, kBlockN)) * shape.num_kv_heads;
  PG_CUDA_REQUIRE(blocks < (int64_t{1} << 31), "attention_backward: too many blocks for a one-dimensional grid");
  attention_backward_ws_kernel<<<static_cast<unsigned>(blocks), kThreads, WsLayout::kBytes, stream>>>(params);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda::attention_detail
