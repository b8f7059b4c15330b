// The arithmetic of the Hopper backward main kernels (attention_backward_wgmma.cu, and the
// warp-specialized attention_backward_ws.cu), per warpgroup of 64 keys and query tile of 64 queries
// ("keys as rows", M = the warpgroup's 64 keys; attention_backward_wgmma.cu's header gives the
// products and their operand forms), and the block's work from the prepare kernel's list.
//
// Per thread (warp w of its warpgroup, g = lane / 4, t = lane % 4), accumulator element 4j + e of a
// 64x64 product is row 16w + g + 8·(e / 2), column 8j + 2t + (e % 2) (wgmma.cuh): rows are keys for
// Sᵀ, dPᵀ, dK, dV and queries for dQ; columns are queries for Sᵀ, dPᵀ and dh for dK, dV, dQ.
#pragma once

#include <cstdint>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda::attention_detail {

constexpr int kQueryTile = 64;        // queries per tile (the N of Sᵀ, the M of dQ)
constexpr int kTileBytes = 64 * 128;  // one SwizzledTile64 of 64 rows (8 atoms)

__device__ __forceinline__ void store_shared_u32(uint32_t address, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(value));
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

// Where one warpgroup's products of a query tile read and write: its 64 K and V rows (K-major A
// descriptors), the tile's Q and dO (descriptors of their 64-row SwizzledTile64s), LSE and D of the
// tile's 64 queries in shared memory; the warpgroup's first key and this thread's (accumulator rows
// e < 2), segment-local.
struct KeyTileOperands {
  uint64_t k_desc, v_desc, q_desc, do_desc;
  const float* lse_s;
  const float* delta_s;
  int wg_key0, thread_key0;
};

// One warpgroup's products of a query tile up to dSᵀ: Sᵀ and dPᵀ (4 k-steps over dh each, A rows
// and B rows 32·kk bytes in, both K-major; two commit groups, so that Pᵀ is computed while dPᵀ is
// still in flight), Pᵀ, dV += Pᵀ·dO, dSᵀ = Pᵀ ∘ (dPᵀ − D), dK += dSᵀ·Q. Returns with the dV and dK
// products in flight (wgmma_wait<0> before dk_acc, dv_acc or the Q and dO tiles are touched again)
// and dSᵀ (bf16, the rounding the dK product used) in ds_frag.
// kDvBeforeDs: dV is issued before dSᵀ is computed, overlapping them, but then Pᵀ's bf16 fragments
// (16 registers, read by the asynchronous product) live through dSᵀ beside Sᵀ and dPᵀ: the wgmma
// kernel's order (its warpgroups run in step, so its tensor cores would idle otherwise). Without it,
// dV and dK are issued together after dSᵀ, Pᵀ and dSᵀ packed from fp32 only then: fewer registers
// live at once (the warp-specialized kernel's 160 a consumer thread), the same values.
template <bool kDvBeforeDs>
__device__ __forceinline__ void key_tile_products(const KeyTileOperands& op, int q_start, int seg_length, int lane,
                                                  float (&dk_acc)[32], float (&dv_acc)[32],
                                                  uint32_t (&ds_frag)[4][4]) {
  float s[32], dp[32];
  wgmma_fence();
  wgmma_m64n64k16_bf16_ss<false, 0, 0>(s, k_major_step(op.k_desc, 0), k_major_step(op.q_desc, 0));
#pragma unroll
  for (int kk = 1; kk < 4; ++kk)
    wgmma_m64n64k16_bf16_ss<true, 0, 0>(s, k_major_step(op.k_desc, kk), k_major_step(op.q_desc, kk));
  wgmma_commit();
  wgmma_m64n64k16_bf16_ss<false, 0, 0>(dp, k_major_step(op.v_desc, 0), k_major_step(op.do_desc, 0));
#pragma unroll
  for (int kk = 1; kk < 4; ++kk)
    wgmma_m64n64k16_bf16_ss<true, 0, 0>(dp, k_major_step(op.v_desc, kk), k_major_step(op.do_desc, kk));
  wgmma_commit();

  wgmma_wait<1>();  // Sᵀ
  wgmma_fence_operands(s);
  // Queries all after the warpgroup's 64 keys (tile starts are multiples of 64) and in the segment.
  if (q_start > op.wg_key0 && q_start + kQueryTile <= seg_length)
    probabilities<false>(s, op.lse_s, lane, q_start, op.thread_key0, seg_length);
  else
    probabilities<true>(s, op.lse_s, lane, q_start, op.thread_key0, seg_length);
  // dV += Pᵀ dO: 4 k-steps over the tile's queries; dO rows 16kq.. start 2048·kq bytes in.
  uint32_t p_frag[4][4];
  auto issue_dv = [&] {
    accumulators_to_a_fragments(s, p_frag);
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < 4; ++kq) wgmma_m64n64k16_bf16<true, 1>(dv_acc, p_frag[kq], mn_major_step(op.do_desc, kq));
    wgmma_commit();
  };
  if constexpr (kDvBeforeDs) {
    issue_dv();
    wgmma_wait<1>();  // dPᵀ (committed before dV)
  } else {
    wgmma_wait<0>();  // dPᵀ
  }
  wgmma_fence_operands(dp);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int qi = 8 * j + 2 * (lane & 3);
    const float2 delta2 = *reinterpret_cast<const float2*>(op.delta_s + qi);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float delta = (e & 1) ? delta2.y : delta2.x;
      dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - delta);
    }
  }
  if constexpr (!kDvBeforeDs) issue_dv();
  // dK += dSᵀ Q, the same way.
  accumulators_to_a_fragments(dp, ds_frag);
  wgmma_fence();
#pragma unroll
  for (int kq = 0; kq < 4; ++kq) wgmma_m64n64k16_bf16<true, 1>(dk_acc, ds_frag[kq], mn_major_step(op.q_desc, kq));
  wgmma_commit();
}

// dSᵀ of the warpgroup's 64 keys → rows 0..63 of `ds_rows` ([key][query]): element 4j + e is key row
// 16w + g + 8·(e / 2), query column 8j + 2t + (e % 2); the pairs (e, e + 1) are adjacent columns, one
// 4-byte store each. The caller fences (fence_proxy_async_shared) before the tensor cores read them.
__device__ __forceinline__ void store_ds_rows(const SwizzledTile64& ds_rows, const uint32_t (&ds_frag)[4][4],
                                              int wg_warp, int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      store_shared_u32(ds_rows.pair_address(wg_warp * 16 + (lane >> 2) + r * 8, 8 * j + 2 * (lane & 3)),
                       ds_frag[j / 2][(j % 2) * 2 + r]);
  }
}

// dQ (64 queries x 64 dh) = dS · K over the kKeySteps · 16 keys of a dSᵀ tile [key][query] and the
// matching K rows [key][dh]: keys 16kk.. are rows 16kk.. of both (A, MN-major: 64 queries contiguous
// per key row; B, MN-major: 64 dh contiguous per key row), 2048·kk bytes in. Committed, not waited for.
template <int kKeySteps>
__device__ __forceinline__ void issue_dq(float (&dq)[32], uint64_t ds_desc, uint64_t k_desc) {
  wgmma_fence();
  wgmma_m64n64k16_bf16_ss<false, 1, 1>(dq, mn_major_step(ds_desc, 0), mn_major_step(k_desc, 0));
#pragma unroll
  for (int kk = 1; kk < kKeySteps; ++kk)
    wgmma_m64n64k16_bf16_ss<true, 1, 1>(dq, mn_major_step(ds_desc, kk), mn_major_step(k_desc, kk));
  wgmma_commit();
}

// Adds a warp's part of a dQ tile (dq[4j + e]: rows g + 8·(e / 2) of its 16 queries, from token0,
// columns 8j + 2t + (e % 2)) to the fp32 accumulator with float4 atomics: lanes t and t ^ 1 swap
// halves so that the even lane holds 4 consecutive columns of row g, the odd lane of row g + 8. Rows
// from seg_rows_left on are not added.
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

// dK (times the softmax scale left out of dS) and dV of a warpgroup's keys: element 4j + e is key
// thread_key0 + 8·(e / 2) (segment-local), dh column 8j + 2t + (e % 2). Keys past the segment are not written.
__device__ __forceinline__ void store_dk_dv(const AttentionBackwardParams& p, const float (&dk_acc)[32],
                                            const float (&dv_acc)[32], const SegmentTile& seg, int kv_head,
                                            int thread_key0, int lane) {
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

// The walk of a block whose keys start at key_start (segment-local, a multiple of kQueryTile): for
// each query head of the group, the query tiles from key_start to the segment's end. (Walking them
// from the segment's end instead, so that the blocks of one segment read the same query rows at about
// the same time, measured no faster with either block order: dense T = 2048 on an H100, 1.655 against
// 1.651 ms for the warp-specialized kernel, 1.875 against 1.856 for the wgmma one.)
struct QueryTile {
  int head, q_start;
};
__device__ __forceinline__ QueryTile next_query_tile(QueryTile t, int key_start, int seg_length) {
  t.q_start += kQueryTile;
  if (t.q_start >= seg_length) t.q_start = key_start, ++t.head;
  return t;
}

}  // namespace pgolf::cuda::attention_detail
