// Flash attention backward main kernel on Hopper's warpgroup MMA (wgmma, sm_90a). Same scheme and
// semantics as the mma.sync kernel (attention_backward.cu, whose prepare and finish kernels run
// around this one): one block per (key tile, KV head) walks every query tile at or after its keys for
// each query head of the group. Each warpgroup (4 warps) owns 64 keys; a block has 64 · kWarpgroups.
// Per 64-query tile, per warpgroup (M = its 64 keys throughout, "keys as rows"):
//   Sᵀ  = K · Qᵀ     A = K rows (smem, K-major), B = Q tile [query][dh] (smem, K-major: rows = n)
//   dPᵀ = V · dOᵀ    A = V rows, B = dO tile, the same forms
//   Pᵀ  = exp2(scale·log2e·Sᵀ − log2e·LSE) (0 where key > query or query ≥ segment length)
//   dSᵀ = Pᵀ ∘ (dPᵀ − D)  (the softmax scale 1/8, a power of two, is applied to dK at the end
//                    and to dQ by the finish kernel: the same bits as scaling dS, one multiply less)
//   dV += Pᵀ · dO    A = Pᵀ from registers (the accumulator → A-fragment identity of wgmma.cuh),
//                    B = dO tile read MN-major (rows = k = queries, dh contiguous), as the forward's V
//   dK += dSᵀ · Q    A = dSᵀ from registers, B = Q tile MN-major
//   dQ_part = dS · K_wg   (M = 64 queries, K = the warpgroup's 64 keys, N = dh): dSᵀ (bf16) goes to a
//                    shared tile [key][query]; A = dS reads it MN-major (rows = k = keys, the 64
//                    queries = m contiguous), B = K rows MN-major (rows = k = keys, dh contiguous).
// With one warpgroup the block adds its dQ_part to the fp32 accumulator with float4 atomics (sm_90)
// straight from registers. With two or three warpgroups (128 or 192 keys a block: the Q, dO loads
// and the dQ atomics, which bound the one-warpgroup kernel by L2 throughput, are shared by more
// keys) each warpgroup writes its dQ_part to shared memory; at the start of the next iteration all
// threads sum the parts and issue the atomics, one float4 per (query, 4 dh) per block. Each
// iteration has one block barrier: the query tiles, LSE, D and the dQ parts are double-buffered, so
// the barrier at the top of iteration it both publishes tile it and retires iteration it - 1. The
// blocks take their key tiles from the prepare kernel's work list, longest first (block_work). The
// products of a warpgroup are in attention_backward_wgmma.cuh, shared with the warp-specialized
// kernel (attention_backward_ws.cu).
#include "backend/cuda/attention_backward_wgmma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

constexpr int kDqPartFloats = kQueryTile * 64;  // one warpgroup's fp32 dQ_part [64 queries][64 dh]

// Shared memory, every tile on an atom boundary:
//   K, V, dSᵀ: kWarpgroups tiles of 64 key rows each (warpgroup i owns rows 64i..64i+63);
//   Q and dO, two buffers each; LSE and D of 64 queries, two buffers each;
//   with two or three warpgroups, the dQ parts: two buffers of one part per warpgroup.
template <int kWarpgroups>
struct BackwardSmem {
  static constexpr int kKeyTiles = 3 * kWarpgroups * kTileBytes;
  static constexpr int kQueryTiles = 4 * kTileBytes;
  static constexpr int kStats = 4 * kQueryTile * 4;
  static constexpr int kDqParts = kWarpgroups > 1 ? 2 * kWarpgroups * kDqPartFloats * 4 : 0;
  static constexpr int kBytes = kKeyTiles + kQueryTiles + kStats + kDqParts + kSwizzleAtomBytes;
};

// The 128 threads of one warpgroup: named barrier 1 + warpgroup (0 is __syncthreads). Immediate ids,
// so that ptxas reserves 2 barriers rather than all 16.
__device__ __forceinline__ void warpgroup_barrier(int warpgroup) {
  if (warpgroup == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
  else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// Two or three warpgroups: a dQ_part [64 queries][64 dh] fp32 in shared memory, row-major with the
// columns of row r XORed with 8·(r % 8) (bits 3..5), so that both the float2 stores of the
// accumulator layout and the float4 reads of 4 consecutive columns are free of bank conflicts.
__device__ __forceinline__ int dq_part_index(int row, int col) { return row * 64 + (col ^ (8 * (row & 7))); }

__device__ __forceinline__ void store_dq_part(float* part, const float (&dq)[32], int wg_warp, int lane) {
  const int row = wg_warp * 16 + (lane >> 2);  // row + 8 has the same row % 8
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int col = 8 * j + 2 * (lane & 3);
    *reinterpret_cast<float2*>(part + dq_part_index(row, col)) = make_float2(dq[4 * j], dq[4 * j + 1]);
    *reinterpret_cast<float2*>(part + dq_part_index(row + 8, col)) = make_float2(dq[4 * j + 2], dq[4 * j + 3]);
  }
}

// Sums the dQ parts of the first `active` warpgroups (parts kDqPartFloats apart) and adds the tile's
// rows < valid_rows to the accumulator at dst (row r at dst + r · row_stride): float4 atomics, the
// kThreads threads of the block taking 4 consecutive columns each in turn.
template <int kWarpgroups>
__device__ __forceinline__ void add_dq_parts(const float* parts, int active, float* dst, int64_t row_stride,
                                             int valid_rows, int tid) {
  constexpr int kThreads = 128 * kWarpgroups, kQuads = kQueryTile * 16;
#pragma unroll
  for (int i = 0; i < (kQuads + kThreads - 1) / kThreads; ++i) {
    const int quad = tid + i * kThreads;
    const int row = quad >> 4, col = (quad & 15) * 4;
    if (quad >= kQuads || row >= valid_rows) continue;
    const int index = dq_part_index(row, col);
    float4 sum = *reinterpret_cast<const float4*>(parts + index);
#pragma unroll
    for (int w = 1; w < kWarpgroups; ++w) {
      if (w >= active) break;
      const float4 v = *reinterpret_cast<const float4*>(parts + w * kDqPartFloats + index);
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    atomicAdd(reinterpret_cast<float4*>(dst + row * row_stride + col), sum);
  }
}

// Registers: the dK and dV accumulators (64 floats) stay with Sᵀ and dPᵀ (64 more) and the A
// fragments (32): 168 a thread, 12 warps per multiprocessor either as three blocks of one warpgroup
// (shared memory 3 x 58 KB, no spills) or one block of three (202 KB; ptxas 13.0 spills 20 bytes);
// two warpgroups: one block (189 registers, 146 KB).
template <int kWarpgroups>
__global__ void __launch_bounds__(kWarpgroups * 128, kWarpgroups == 1 ? 3 : 1)
    attention_backward_wgmma_kernel(const AttentionBackwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBlockN = 64 * kWarpgroups, kBlockM = kQueryTile;
  using Smem = BackwardSmem<kWarpgroups>;
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2, wg_warp = warp & 3;
  const BlockWork work = block_work(p, kBlockN);
  const int kv_head = work.kv_head;
  const SegmentTile seg = work.seg;
  if (!seg.valid) return;
  const int key_start = seg.tile * kBlockN;  // segment-local, a multiple of kBlockM
  const int head_end = (kv_head + 1) * p.group;  // the walk ends at this query head

  const uint32_t smem_base = (smem_address(smem) + (kSwizzleAtomBytes - 1)) & ~uint32_t(kSwizzleAtomBytes - 1);
  const SwizzledTile64 k_tile{smem_base};  // kBlockN rows, then V, then dSᵀ
  const SwizzledTile64 v_tile{smem_base + kBlockN * 128};
  const SwizzledTile64 ds_tile{smem_base + 2 * kBlockN * 128};
  const uint32_t query_base = smem_base + Smem::kKeyTiles;
  auto q_tile = [&](int buf) { return SwizzledTile64{query_base + static_cast<uint32_t>(buf * 2 * kTileBytes)}; };
  auto do_tile = [&](int buf) { return SwizzledTile64{query_base + static_cast<uint32_t>((buf * 2 + 1) * kTileBytes)}; };
  unsigned char* const aligned = smem + (smem_base - smem_address(smem));
  float* const stats = reinterpret_cast<float*>(aligned + Smem::kKeyTiles + Smem::kQueryTiles);
  auto lse_rows = [&](int buf) { return stats + buf * 2 * kBlockM; };
  auto delta_rows = [&](int buf) { return stats + (buf * 2 + 1) * kBlockM; };
  float* const dq_parts = reinterpret_cast<float*>(aligned + Smem::kKeyTiles + Smem::kQueryTiles + Smem::kStats);
  auto dq_parts_of = [&](int buf) { return dq_parts + buf * kWarpgroups * kDqPartFloats; };

  // The walk: for each query head of the group, the query tiles from the block's first key to the
  // segment end (next_query_tile).
  auto next_tile = [&](QueryTile t) { return next_query_tile(t, key_start, seg.length); };
  // Q is copied by the first warpgroup, dO, LSE and D by the last (the same one when there is one).
  auto load_queries = [&](QueryTile t, int buf) {
    const int head = t.head, q_start = t.q_start;
    const int rows = min(kBlockM, seg.length - q_start);  // rows past the segment are zero-filled
    const int64_t token0 = seg.start + q_start;
    const int64_t offset = token0 * p.q_row_stride + head * kHeadDim;
    const int wg_tid = tid & 127;
    if (warpgroup == 0) q_tile(buf).template load_async<kBlockM, 128>(p.q + offset, p.q_row_stride, rows, wg_tid);
    if (warpgroup == kWarpgroups - 1) {
      do_tile(buf).template load_async<kBlockM, 128>(p.d_o + offset, p.q_row_stride, rows, wg_tid);
      const int i = wg_tid & (kBlockM - 1);
      const int64_t stat = static_cast<int64_t>(head) * p.total_tokens + token0 + i;
      if (wg_tid < kBlockM) cp_async_4(smem_address(lse_rows(buf) + i), p.lse + (i < rows ? stat : 0), i < rows);
      else cp_async_4(smem_address(delta_rows(buf) + i), p.delta + (i < rows ? stat : 0), i < rows);
    }
  };
  // Warpgroup w has work for query tile q_start when its first key is at or before the tile's last
  // query (q_start >= key_start always).
  auto active_warpgroups = [&](int q_start) { return min(kWarpgroups, (q_start + kBlockM - 1 - key_start) / 64 + 1); };

  {  // K and V of the block's keys; keys past the segment are zero-filled (and masked below)
    const int64_t offset = static_cast<int64_t>(seg.start + key_start) * p.kv_row_stride + kv_head * kHeadDim;
    const int rows = seg.length - key_start;
    k_tile.load_async<kBlockN, kThreads>(p.k + offset, p.kv_row_stride, rows, tid);
    v_tile.load_async<kBlockN, kThreads>(p.v + offset, p.kv_row_stride, rows, tid);
  }
  QueryTile tile{kv_head * p.group, key_start}, previous = tile;
  load_queries(tile, 0);
  cp_async_commit();

  // This warpgroup's 64 keys: rows 64·warpgroup.. of the K, V and dSᵀ tiles (8 atoms in).
  const uint32_t wg_row_offset = static_cast<uint32_t>(warpgroup * kTileBytes);
  const uint32_t k_rows = k_tile.base + wg_row_offset, v_rows = v_tile.base + wg_row_offset;
  const SwizzledTile64 ds_rows{ds_tile.base + wg_row_offset};
  const uint64_t k_desc = swizzled_tile_descriptor(k_rows), v_desc = swizzled_tile_descriptor(v_rows);
  const uint64_t ds_desc = swizzled_tile_descriptor(ds_rows.base);
  const int wg_key0 = key_start + warpgroup * 64;  // segment-local first key of the warpgroup
  const int thread_key0 = wg_key0 + wg_warp * 16 + (lane >> 2);  // key of accumulator rows e < 2
  float dk_acc[32] = {}, dv_acc[32] = {};

  int buf = 0;  // the query buffer of `tile`
  for (bool first = true; tile.head < head_end; first = false, buf ^= 1, previous = tile, tile = next_tile(tile)) {
    cp_async_wait<0>();          // this iteration's queries (and K, V) have landed for this thread's copies
    fence_proxy_async_shared();  // ... and are visible to the tensor cores' reads after the barrier
    // Every thread's copies have landed, and every warpgroup is done with the previous tile: its MMAs
    // no longer read buffer buf ^ 1, and its dQ part of that tile is in shared memory.
    __syncthreads();
    if (const QueryTile next = next_tile(tile); next.head < head_end) {
      load_queries(next, buf ^ 1);
      cp_async_commit();
    }
    const int head = tile.head, q_start = tile.q_start;
    const uint64_t q_desc = swizzled_tile_descriptor(q_tile(buf).base);
    const uint64_t do_desc = swizzled_tile_descriptor(do_tile(buf).base);
    const bool active = kWarpgroups == 1 || wg_key0 <= q_start + kBlockM - 1;  // one warpgroup: key_start <= q_start

    if constexpr (kWarpgroups > 1) {  // the previous tile's dQ (the atomics need no wait)
      if (!first) {
        const int prev_head = previous.head, prev_q_start = previous.q_start;
        add_dq_parts<kWarpgroups>(dq_parts_of(buf ^ 1), active_warpgroups(prev_q_start),
                                  p.dq_accum + (seg.start + prev_q_start) * p.q_row_stride + prev_head * kHeadDim,
                                  p.q_row_stride, seg.length - prev_q_start, tid);
      }
    }
    // A warpgroup whose first key is after the tile's last query contributes nothing (the later
    // warpgroups on the block's first query tiles, or keys past the segment end).
    if (!active) continue;
    uint32_t ds_frag[4][4];
    key_tile_products<true>({k_desc, v_desc, q_desc, do_desc, lse_rows(buf), delta_rows(buf), wg_key0, thread_key0},
                      q_start, seg.length, lane, dk_acc, dv_acc, ds_frag);
    // dSᵀ → this warpgroup's rows of the shared tile. The previous iteration's dQ_part MMA, which
    // read these rows, completed before its wgmma_wait<0>.
    store_ds_rows(ds_rows, ds_frag, wg_warp, lane);
    fence_proxy_async_shared();  // the st.shared above are read next by the tensor cores
    warpgroup_barrier(warpgroup);

    // dQ_part (64 queries x 64 dh) = dS · K_wg over the warpgroup's 64 keys.
    float dq[32];
    issue_dq<4>(dq, ds_desc, k_desc);
    wgmma_wait<0>();  // dV, dK and dQ_part
    wgmma_fence_operands(dq);
    wgmma_fence_operands(dk_acc);
    wgmma_fence_operands(dv_acc);

    // dq[4j + e] is query row 16w + g + 8·(e / 2), dh column 8j + 2t + (e % 2) of the tile.
    if constexpr (kWarpgroups == 1) {
      const int tile_row0 = q_start + wg_warp * 16;  // segment-local first query of this warp's rows
      add_dq_rows(p, dq, seg.start + tile_row0, seg.length - tile_row0, head, lane);
    } else {
      store_dq_part(dq_parts_of(buf) + warpgroup * kDqPartFloats, dq, wg_warp, lane);
    }
  }
  if constexpr (kWarpgroups > 1) {  // the last tile's dQ
    __syncthreads();
    const int head = previous.head, q_start = previous.q_start;  // tile is past the walk's end
    add_dq_parts<kWarpgroups>(dq_parts_of(buf ^ 1), active_warpgroups(q_start),
                              p.dq_accum + (seg.start + q_start) * p.q_row_stride + head * kHeadDim, p.q_row_stride,
                              seg.length - q_start, tid);
  }

  store_dk_dv(p, dk_acc, dv_acc, seg, kv_head, thread_key0, lane);
#else
  __trap();  // built without sm_90a (PGOLF_CUDA_ARCH): fail loudly rather than compute nothing
#endif
}

template <int kWarpgroups>
void launch(const AttentionBackwardParams& p, const AttentionShape& shape, cudaStream_t stream) {
  constexpr int bytes = BackwardSmem<kWarpgroups>::kBytes;
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_wgmma_kernel<kWarpgroups>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  const int64_t blocks = static_cast<int64_t>(segment_tile_grid(shape, 64 * kWarpgroups)) * shape.num_kv_heads;
  PG_CUDA_REQUIRE(blocks < (int64_t{1} << 31), "attention_backward: too many blocks for a one-dimensional grid");
  const dim3 grid(static_cast<unsigned>(blocks));
  attention_backward_wgmma_kernel<kWarpgroups><<<grid, kWarpgroups * 128, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

int attention_backward_wgmma_schedule_keys(int warps) {
  PG_CUDA_REQUIRE(warps == 4 || warps == 8 || warps == 12,
                  "attention_backward: tuning.backward_warps must be 4, 8 or 12 with the wgmma kernel");
  return warps == 12 ? 16 * warps : 0;
}

void launch_attention_backward_wgmma(const AttentionBackwardParams& p, const AttentionShape& shape, int warps,
                                     cudaStream_t stream) {
  attention_backward_wgmma_schedule_keys(warps);  // checks `warps`
  require_hopper("attention_backward: the wgmma kernel needs an sm_90 (Hopper) GPU");
  if (warps == 4) launch<1>(p, shape, stream);
  else if (warps == 8) launch<2>(p, shape, stream);
  else launch<3>(p, shape, stream);
}

}  // namespace pgolf::cuda::attention_detail
