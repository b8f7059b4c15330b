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
// blocks take their key tiles from the prepare kernel's work list, longest first (block_work).
//
// Per thread (warp w of its warpgroup, g = lane / 4, t = lane % 4), accumulator element 4j + e of a
// 64x64 product is row 16w + g + 8·(e / 2), column 8j + 2t + (e % 2) (wgmma.cuh): rows are keys for
// Sᵀ, dPᵀ, dK, dV and queries for dQ; columns are queries for Sᵀ, dPᵀ and dh for dK, dV, dQ.
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {
namespace {

constexpr int kSwizzleAtomBytes = 1024;  // tile starts must be aligned to this (wgmma.cuh)
constexpr int kQueryTile = 64;           // queries per tile (the N of Sᵀ, the M of dQ)
constexpr int kTileBytes = 64 * 128;     // one SwizzledTile64 of 64 rows (8 atoms)

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

__device__ __forceinline__ void store_shared_u32(uint32_t address, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(value));
}

// The 128 threads of one warpgroup: named barrier 1 + warpgroup (0 is __syncthreads). Immediate ids,
// so that ptxas reserves 2 barriers rather than all 16.
__device__ __forceinline__ void warpgroup_barrier(int warpgroup) {
  if (warpgroup == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
  else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// Rounds the fp32 accumulators of a 64x64 Pᵀ or dSᵀ (rows = keys, columns = queries) to the A
// fragments of the k-steps over queries: k-step kq (queries 16kq..16kq+15) is accumulator groups
// j = 2kq (columns 16kq + 2t, +1) and 2kq + 1 (columns 16kq + 8 + 2t, +1), rows g and g + 8 — the
// A layout {row g, k 2t}, {row g+8, k 2t}, {row g, k 2t+8}, {row g+8, k 2t+8} of wgmma.cuh.
__device__ __forceinline__ void accumulators_to_a_fragments(const float (&acc)[32], uint32_t (&frag)[4][4]) {
#pragma unroll
  for (int kq = 0; kq < 4; ++kq) {
    frag[kq][0] = pack_bf16(acc[8 * kq], acc[8 * kq + 1]);
    frag[kq][1] = pack_bf16(acc[8 * kq + 2], acc[8 * kq + 3]);
    frag[kq][2] = pack_bf16(acc[8 * kq + 4], acc[8 * kq + 5]);
    frag[kq][3] = pack_bf16(acc[8 * kq + 6], acc[8 * kq + 7]);
  }
}

// Pᵀ = exp2(scale·log2e·Sᵀ − log2e·LSE) in place (accumulator layout: element 4j + e is key
// thread_key0 + 8·(e / 2), tile query 8j + 2t + (e % 2)). kMasked: 0 where key > query or query ≥
// seg_length; tiles entirely after the warpgroup's keys and inside the segment skip those tests.
template <bool kMasked>
__device__ __forceinline__ void probabilities(float (&s)[32], const float* lse_s, int lane, int q_start,
                                              int thread_key0, int seg_length) {
  constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int qi = 8 * j + 2 * (lane & 3);  // tile-local query of elements e = 0, 2 (e = 1, 3: qi + 1)
    const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + qi);
    const float bias0 = -lse2.x * kLog2e, bias1 = -lse2.y * kLog2e;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float bias = (e & 1) ? bias1 : bias0;
      if constexpr (kMasked) {
        const int query = q_start + qi + (e & 1);
        const int key = thread_key0 + (e >> 1) * 8;
        const bool visible = key <= query && query < seg_length;
        s[4 * j + e] = visible ? exp2_approx(fmaf(s[4 * j + e], kScaleLog2, bias)) : 0.f;
      } else {
        s[4 * j + e] = exp2_approx(fmaf(s[4 * j + e], kScaleLog2, bias));
      }
    }
  }
}

// Step descriptors from a tile's descriptor (swizzled_tile_descriptor of its base): the step's byte
// offset >> 4 added to the start-address field (bits 0-13). Shared addresses stay below 2^18 bytes,
// so the sum never carries out of the field. K-major: 32·kk bytes; MN-major: 2048·kk bytes (wgmma.cuh).
__device__ __forceinline__ uint64_t k_major_step(uint64_t tile_descriptor, int kk) { return tile_descriptor + 2 * kk; }
__device__ __forceinline__ uint64_t mn_major_step(uint64_t tile_descriptor, int kk) { return tile_descriptor + 128 * kk; }

// One warpgroup: adds a thread's part of a dQ tile (dq[4j + e]: rows g + 8·(e / 2) of its warp's 16
// queries, columns 8j + 2t + (e % 2)) to the fp32 accumulator with float4 atomics: lanes t and t ^ 1
// swap halves so that the even lane holds 4 consecutive columns of row g, the odd lane of row g + 8.
__device__ __forceinline__ void add_dq_rows(const AttentionBackwardParams& p, const float (&dq)[32], int64_t token0,
                                            int seg_rows_left, int head, int lane) {
  const bool odd = lane & 1;
  const int row = (lane >> 2) + (odd ? 8 : 0);  // row within the warp's 16, relative to token0
  const int col = 2 * ((lane & 3) & ~1);
  float4 values[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    // Even lane sends its row g + 8 pair, odd lane its row g pair.
    const float send0 = odd ? dq[4 * j] : dq[4 * j + 2], send1 = odd ? dq[4 * j + 1] : dq[4 * j + 3];
    const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
    values[j] = odd ? make_float4(got0, got1, dq[4 * j + 2], dq[4 * j + 3]) : make_float4(dq[4 * j], dq[4 * j + 1], got0, got1);
  }
  if (row >= seg_rows_left) return;  // one branch and one address for the 8 atomics
  float4* dst = reinterpret_cast<float4*>(p.dq_accum + (token0 + row) * p.q_row_stride + head * kHeadDim + col);
#pragma unroll
  for (int j = 0; j < 8; ++j) atomicAdd(dst + 2 * j, values[j]);
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

// The block's KV head and key tile. The grid is one-dimensional, Hkv · (num_segments + N / block_n)
// blocks (segment_tile_grid per KV head), at least Hkv per entry of the work list: block b takes
// entry b / Hkv (the longest first) for KV head b % Hkv. Without a list (count -1: 64- or 128-key
// blocks, or a segment of more than kMaxScheduleTiles tiles), KV head b / G takes flat tile b % G
// of find_segment_tile, G = gridDim.x / Hkv (the order of the former two-dimensional grid).
struct BlockWork {
  int kv_head;
  SegmentTile seg;
};

__device__ __forceinline__ BlockWork block_work(const AttentionBackwardParams& p, int block_n) {
  const int num_kv_heads = gridDim.x / (p.num_segments + p.total_tokens / block_n);
  const int block = blockIdx.x, count = p.tile_schedule[0].x;
  BlockWork w;
  if (count >= 0) {
    const int rank = block / num_kv_heads;
    w.kv_head = block % num_kv_heads;
    w.seg.valid = rank < count;
    if (w.seg.valid) {
      const int2 entry = p.tile_schedule[1 + rank];  // (segment, tile)
      w.seg.start = __ldg(p.cu + entry.x);
      w.seg.length = __ldg(p.cu + entry.x + 1) - w.seg.start;
      w.seg.tile = entry.y;
    }
  } else {
    const int per_head = gridDim.x / num_kv_heads;
    w.kv_head = block / per_head;
    w.seg = find_segment_tile(p.cu, p.num_segments, block % per_head, block_n);
  }
  return w;
}

// Registers: the dK and dV accumulators (64 floats) stay with Sᵀ and dPᵀ (64 more) and the A
// fragments (32): 168 a thread, 12 warps per multiprocessor either as three blocks of one warpgroup
// (shared memory 3 x 58 KB, no spills) or one block of three (202 KB; ptxas 13.0 spills 16 bytes);
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

  // The walk: for each query head of the group, the query tiles from the block's first key (a
  // multiple of kBlockM) to the segment end.
  struct QueryTile {
    int head, q_start;
  };
  auto next_tile = [&](QueryTile t) {
    t.q_start += kBlockM;
    if (t.q_start >= seg.length) t.q_start = key_start, ++t.head;
    return t;
  };
  auto previous_tile = [&](QueryTile t) {
    return t.q_start == key_start ? QueryTile{t.head - 1, (seg.length - 1) / kBlockM * kBlockM}
                                  : QueryTile{t.head, t.q_start - kBlockM};
  };
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
  QueryTile tile{kv_head * p.group, key_start};
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
  for (bool first = true; tile.head < head_end; first = false, buf ^= 1, tile = next_tile(tile)) {
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
        const QueryTile prev = previous_tile(tile);
        const int prev_head = prev.head, prev_q_start = prev.q_start;
        add_dq_parts<kWarpgroups>(dq_parts_of(buf ^ 1), active_warpgroups(prev_q_start),
                                  p.dq_accum + (seg.start + prev_q_start) * p.q_row_stride + prev_head * kHeadDim,
                                  p.q_row_stride, seg.length - prev_q_start, tid);
      }
    }
    // Sᵀ and dPᵀ (64 keys x 64 queries), 4 k-steps over dh each: A rows are 32·kk bytes into each
    // K / V row, B likewise into each Q / dO row (both K-major). Two commit groups, so that Pᵀ is
    // computed while dPᵀ is still in flight.
    float s[32], dp[32];
    if (active) {
      wgmma_fence();
      wgmma_m64n64k16_bf16_ss<false, 0, 0>(s, k_major_step(k_desc, 0), k_major_step(q_desc, 0));
#pragma unroll
      for (int kk = 1; kk < 4; ++kk)
        wgmma_m64n64k16_bf16_ss<true, 0, 0>(s, k_major_step(k_desc, kk), k_major_step(q_desc, kk));
      wgmma_commit();
      wgmma_m64n64k16_bf16_ss<false, 0, 0>(dp, k_major_step(v_desc, 0), k_major_step(do_desc, 0));
#pragma unroll
      for (int kk = 1; kk < 4; ++kk)
        wgmma_m64n64k16_bf16_ss<true, 0, 0>(dp, k_major_step(v_desc, kk),
                                            k_major_step(do_desc, kk));
      wgmma_commit();
    }
    // A warpgroup whose first key is after the tile's last query contributes nothing (the later
    // warpgroups on the block's first query tiles, or keys past the segment end).
    if (!active) continue;

    const float* lse_s = lse_rows(buf);
    const float* delta_s = delta_rows(buf);
    wgmma_wait<1>();  // Sᵀ
    wgmma_fence_operands(s);
    // Queries all after the warpgroup's 64 keys (tile starts are multiples of 64) and in the segment.
    if (q_start > wg_key0 && q_start + kBlockM <= seg.length)
      probabilities<false>(s, lse_s, lane, q_start, thread_key0, seg.length);
    else
      probabilities<true>(s, lse_s, lane, q_start, thread_key0, seg.length);
    // dV += Pᵀ dO: 4 k-steps over the tile's queries; dO rows 16kq.. start 2048·kq bytes in.
    uint32_t p_frag[4][4];
    accumulators_to_a_fragments(s, p_frag);
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < 4; ++kq)
      wgmma_m64n64k16_bf16<true, 1>(dv_acc, p_frag[kq], mn_major_step(do_desc, kq));
    wgmma_commit();

    wgmma_wait<1>();  // dPᵀ (committed before dV)
    wgmma_fence_operands(dp);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int qi = 8 * j + 2 * (lane & 3);
      const float2 delta2 = *reinterpret_cast<const float2*>(delta_s + qi);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float delta = (e & 1) ? delta2.y : delta2.x;
        dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - delta);
      }
    }
    // dK += dSᵀ Q, the same way.
    uint32_t ds_frag[4][4];
    accumulators_to_a_fragments(dp, ds_frag);
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < 4; ++kq)
      wgmma_m64n64k16_bf16<true, 1>(dk_acc, ds_frag[kq], mn_major_step(q_desc, kq));
    wgmma_commit();

    // dSᵀ (bf16, the rounding the dK product used) → this warpgroup's rows of the shared tile:
    // element 4j + e is key row 16w + g + 8·(e / 2), query column 8j + 2t + (e % 2); the pairs
    // (e, e + 1) are adjacent columns, one 4-byte store each. The previous iteration's dQ_part MMA,
    // which read these rows, completed before its wgmma_wait<0>.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        store_shared_u32(ds_rows.pair_address(wg_warp * 16 + (lane >> 2) + r * 8, 8 * j + 2 * (lane & 3)),
                         ds_frag[j / 2][(j % 2) * 2 + r]);
    }
    fence_proxy_async_shared();  // the st.shared above are read next by the tensor cores
    warpgroup_barrier(warpgroup);

    // dQ_part (64 queries x 64 dh) = dS · K_wg over the warpgroup's 64 keys, 4 k-steps: keys 16kk..
    // are rows 16kk.. of both the dSᵀ tile (A, MN-major: 64 queries contiguous per key row) and the
    // K rows (B, MN-major: 64 dh contiguous per key row), 2048·kk bytes in.
    float dq[32];
    wgmma_fence();
    wgmma_m64n64k16_bf16_ss<false, 1, 1>(dq, mn_major_step(ds_desc, 0),
                                         mn_major_step(k_desc, 0));
#pragma unroll
    for (int kk = 1; kk < 4; ++kk)
      wgmma_m64n64k16_bf16_ss<true, 1, 1>(dq, mn_major_step(ds_desc, kk),
                                          mn_major_step(k_desc, kk));
    wgmma_commit();
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
    const QueryTile last = previous_tile(tile);  // tile is past the walk's end
    const int head = last.head, q_start = last.q_start;
    add_dq_parts<kWarpgroups>(dq_parts_of(buf ^ 1), active_warpgroups(q_start),
                              p.dq_accum + (seg.start + q_start) * p.q_row_stride + head * kHeadDim, p.q_row_stride,
                              seg.length - q_start, tid);
  }

  // dK (times the softmax scale left out of dS) and dV of the warpgroup's keys: element 4j + e is
  // key row 16w + g + 8·(e / 2), dh column 8j + 2t + (e % 2).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = thread_key0 + r * 8;
    if (key >= seg.length) continue;
    const int64_t offset =
        static_cast<int64_t>(seg.start + key) * p.kv_row_stride + kv_head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<uint32_t*>(p.dk + offset + 8 * j) = pack_bf16(dk_acc[4 * j + 2 * r] * kSoftmaxScale,
                                                                       dk_acc[4 * j + 2 * r + 1] * kSoftmaxScale);
      *reinterpret_cast<uint32_t*>(p.dv + offset + 8 * j) = pack_bf16(dv_acc[4 * j + 2 * r], dv_acc[4 * j + 2 * r + 1]);
    }
  }
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
