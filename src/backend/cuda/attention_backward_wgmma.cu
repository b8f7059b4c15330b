// Flash attention backward main kernel on Hopper's warpgroup MMA (wgmma, sm_90a). Same scheme and
// semantics as the mma.sync kernel (attention_backward.cu, whose prepare and finish kernels run
// around this one): one block per (key tile, KV head) walks every query tile at or after its keys for
// each query head of the group. Each warpgroup (4 warps) owns 64 keys; a block has 64 · kWarpgroups.
// Per 64-query tile, per warpgroup (M = its 64 keys throughout, "keys as rows"):
//   Sᵀ  = K · Qᵀ     A = K rows (smem, K-major), B = Q tile [query][dh] (smem, K-major: rows = n)
//   dPᵀ = V · dOᵀ    A = V rows, B = dO tile, the same forms
//   Pᵀ  = exp2(scale·log2e·Sᵀ − log2e·LSE) (0 where key > query or query ≥ segment length)
//   dSᵀ = scale · Pᵀ ∘ (dPᵀ − D)
//   dV += Pᵀ · dO    A = Pᵀ from registers (the accumulator → A-fragment identity of wgmma.cuh),
//                    B = dO tile read MN-major (rows = k = queries, dh contiguous), as the forward's V
//   dK += dSᵀ · Q    A = dSᵀ from registers, B = Q tile MN-major
//   dQ_part = dS · K_wg   (M = 64 queries, K = the warpgroup's 64 keys, N = dh): dSᵀ (bf16) goes to a
//                    shared tile [key][query]; A = dS reads it MN-major (rows = k = keys, the 64
//                    queries = m contiguous), B = K rows MN-major (rows = k = keys, dh contiguous).
// With two warpgroups each dQ_part covers half the keys; they swap halves of their 64 dh columns
// through shared memory so that each adds the sum over all 128 keys for its 32 columns: one fp32
// atomic per (query, dh) per block, as with one warpgroup. Atomics are float4 (sm_90).
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

// Shared memory, every tile on an atom boundary:
//   K, V, dSᵀ: kWarpgroups tiles of 64 key rows each (warpgroup i owns rows 64i..64i+63);
//   Q and dO, two buffers each; LSE and D of 64 queries, two buffers each;
//   with two warpgroups, the dQ exchange: per warpgroup 128 threads x 16 floats.
template <int kWarpgroups>
struct BackwardSmem {
  static constexpr int kKeyTiles = 3 * kWarpgroups * kTileBytes;
  static constexpr int kQueryTiles = 4 * kTileBytes;
  static constexpr int kStats = 4 * kQueryTile * 4;
  static constexpr int kExchange = kWarpgroups == 2 ? 2 * 128 * 16 * 4 : 0;
  static constexpr int kBytes = kKeyTiles + kQueryTiles + kStats + kExchange + kSwizzleAtomBytes;
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

// Adds a thread's part of a dQ tile (rows g and g + 8 of its warp's 16 queries, columns
// col0 + 8j + 2t, +1 for j < kGroups) to the fp32 accumulator with float4 atomics: lanes t and t ^ 1
// swap halves so that the even lane holds 4 consecutive columns of row g, the odd lane of row g + 8.
template <int kGroups>
__device__ __forceinline__ void add_dq_rows(const AttentionBackwardParams& p, const float (&dq)[kGroups][4],
                                            int64_t token0, int seg_rows_left, int head, int col0, int lane) {
  const bool odd = lane & 1;
  const int row = (lane >> 2) + (odd ? 8 : 0);  // row within the warp's 16, relative to token0
  const int col = col0 + 2 * ((lane & 3) & ~1);
  float* dst = p.dq_accum + (token0 + row) * p.q_row_stride + head * kHeadDim + col;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    // Even lane sends its row g + 8 pair, odd lane its row g pair.
    const float send0 = odd ? dq[j][0] : dq[j][2], send1 = odd ? dq[j][1] : dq[j][3];
    const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
    const float4 value = odd ? make_float4(got0, got1, dq[j][2], dq[j][3]) : make_float4(dq[j][0], dq[j][1], got0, got1);
    if (row < seg_rows_left) atomicAdd(reinterpret_cast<float4*>(dst + 8 * j), value);
  }
}

// Registers: the dK and dV accumulators (64 floats) stay with Sᵀ and dPᵀ (64 more) and the A
// fragments (32). One warpgroup: three blocks per multiprocessor (168 registers, no spills, 12 warps;
// shared memory 3 x 58 KB); two: one block (186 registers; two would need 128 a thread).
template <int kWarpgroups>
__global__ void __launch_bounds__(kWarpgroups * 128, kWarpgroups == 1 ? 3 : 1)
    attention_backward_wgmma_kernel(const AttentionBackwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBlockN = 64 * kWarpgroups, kBlockM = kQueryTile;
  constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;
  using Smem = BackwardSmem<kWarpgroups>;
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2, wg_warp = warp & 3;
  const int kv_head = blockIdx.y;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockN);
  if (!seg.valid) return;
  const int key_start = seg.tile * kBlockN;  // segment-local
  const int first_q_tile = key_start / kBlockM;
  const int q_tiles_per_head = (seg.length + kBlockM - 1) / kBlockM - first_q_tile;
  const int iterations = p.group * q_tiles_per_head;

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
  float4* const exchange = reinterpret_cast<float4*>(aligned + Smem::kKeyTiles + Smem::kQueryTiles + Smem::kStats);

  auto head_of = [&](int it) { return kv_head * p.group + it / q_tiles_per_head; };
  auto q_start_of = [&](int it) { return (first_q_tile + it % q_tiles_per_head) * kBlockM; };
  auto load_queries = [&](int it, int buf) {
    const int head = head_of(it), q_start = q_start_of(it);
    const int rows = min(kBlockM, seg.length - q_start);  // rows past the segment are zero-filled
    const int64_t token0 = seg.start + q_start;
    const int64_t offset = token0 * p.q_row_stride + head * kHeadDim;
    q_tile(buf).template load_async<kBlockM, kThreads>(p.q + offset, p.q_row_stride, rows, tid);
    do_tile(buf).template load_async<kBlockM, kThreads>(p.d_o + offset, p.q_row_stride, rows, tid);
    const int64_t stat0 = static_cast<int64_t>(head) * p.total_tokens + token0;
    if (tid < kBlockM) {
      cp_async_4(smem_address(lse_rows(buf) + tid), p.lse + (tid < rows ? stat0 + tid : 0), tid < rows);
    } else if (tid < 2 * kBlockM) {
      const int i = tid - kBlockM;
      cp_async_4(smem_address(delta_rows(buf) + i), p.delta + (i < rows ? stat0 + i : 0), i < rows);
    }
  };

  {  // K and V of the block's keys; keys past the segment are zero-filled (and masked below)
    const int64_t offset = static_cast<int64_t>(seg.start + key_start) * p.kv_row_stride + kv_head * kHeadDim;
    const int rows = seg.length - key_start;
    k_tile.load_async<kBlockN, kThreads>(p.k + offset, p.kv_row_stride, rows, tid);
    v_tile.load_async<kBlockN, kThreads>(p.v + offset, p.kv_row_stride, rows, tid);
    cp_async_commit();
  }
  load_queries(0, 0);
  cp_async_commit();

  // This warpgroup's 64 keys: rows 64·warpgroup.. of the K, V and dSᵀ tiles (8 atoms in).
  const uint32_t wg_row_offset = static_cast<uint32_t>(warpgroup * kTileBytes);
  const uint32_t k_rows = k_tile.base + wg_row_offset, v_rows = v_tile.base + wg_row_offset;
  const SwizzledTile64 ds_rows{ds_tile.base + wg_row_offset};
  const int wg_key0 = key_start + warpgroup * 64;  // segment-local first key of the warpgroup
  const int thread_key0 = wg_key0 + wg_warp * 16 + (lane >> 2);  // key of accumulator rows e < 2
  float dk_acc[32] = {}, dv_acc[32] = {};

  for (int it = 0; it < iterations; ++it) {
    const int buf = it & 1;
    if (it + 1 < iterations) load_queries(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();          // this iteration's queries (and K, V) have landed for this thread's copies
    fence_proxy_async_shared();  // ... and are visible to the tensor cores' reads after the barrier
    __syncthreads();
    const int head = head_of(it), q_start = q_start_of(it);
    const uint32_t q_base = q_tile(buf).base, do_base = do_tile(buf).base;

    // A warpgroup whose first key is after the tile's last query contributes nothing (only the second
    // warpgroup on the block's first query tile, or keys past the segment end); its dQ part stays 0.
    float dq[32] = {};
    if (wg_key0 <= q_start + kBlockM - 1) {
      // Sᵀ and dPᵀ (64 keys x 64 queries), 4 k-steps over dh each: A rows are 32·kk bytes into each
      // K / V row, B likewise into each Q / dO row (both K-major). Two commit groups, so that Pᵀ is
      // computed while dPᵀ is still in flight.
      float s[32], dp[32];
      wgmma_fence();
      wgmma_m64n64k16_bf16_ss<false, 0, 0>(s, k_major_step_descriptor(k_rows, 0), k_major_step_descriptor(q_base, 0));
#pragma unroll
      for (int kk = 1; kk < 4; ++kk)
        wgmma_m64n64k16_bf16_ss<true, 0, 0>(s, k_major_step_descriptor(k_rows, kk), k_major_step_descriptor(q_base, kk));
      wgmma_commit();
      wgmma_m64n64k16_bf16_ss<false, 0, 0>(dp, k_major_step_descriptor(v_rows, 0), k_major_step_descriptor(do_base, 0));
#pragma unroll
      for (int kk = 1; kk < 4; ++kk)
        wgmma_m64n64k16_bf16_ss<true, 0, 0>(dp, k_major_step_descriptor(v_rows, kk),
                                            k_major_step_descriptor(do_base, kk));
      wgmma_commit();

      const float* lse_s = lse_rows(buf);
      const float* delta_s = delta_rows(buf);
      wgmma_wait<1>();  // Sᵀ
      wgmma_fence_operands(s);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int qi = 8 * j + 2 * (lane & 3);  // tile-local query of elements e = 0, 2 (e = 1, 3: qi + 1)
        const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + qi);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int query = q_start + qi + (e & 1);
          const int key = thread_key0 + (e >> 1) * 8;
          const bool visible = key <= query && query < seg.length;
          const float lse = (e & 1) ? lse2.y : lse2.x;
          s[4 * j + e] = visible ? exp2_approx(fmaf(s[4 * j + e], kScaleLog2, -lse * kLog2e)) : 0.f;
        }
      }
      // dV += Pᵀ dO: 4 k-steps over the tile's queries; dO rows 16kq.. start 2048·kq bytes in.
      uint32_t p_frag[4][4];
      accumulators_to_a_fragments(s, p_frag);
      wgmma_fence();
#pragma unroll
      for (int kq = 0; kq < 4; ++kq)
        wgmma_m64n64k16_bf16<true, 1>(dv_acc, p_frag[kq], mn_major_step_descriptor(do_base, kq));
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
          dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - delta) * kSoftmaxScale;
        }
      }
      // dK += dSᵀ Q, the same way.
      uint32_t ds_frag[4][4];
      accumulators_to_a_fragments(dp, ds_frag);
      wgmma_fence();
#pragma unroll
      for (int kq = 0; kq < 4; ++kq)
        wgmma_m64n64k16_bf16<true, 1>(dk_acc, ds_frag[kq], mn_major_step_descriptor(q_base, kq));
      wgmma_commit();

      // dSᵀ (bf16, the rounding the dK product used) → this warpgroup's rows of the shared tile:
      // element 4j + e is key row 16w + g + 8·(e / 2), query column 8j + 2t + (e % 2); the pairs
      // (e, e + 1) are adjacent columns, one 4-byte store each.
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
      wgmma_fence();
      wgmma_m64n64k16_bf16_ss<false, 1, 1>(dq, mn_major_step_descriptor(ds_rows.base, 0),
                                           mn_major_step_descriptor(k_rows, 0));
#pragma unroll
      for (int kk = 1; kk < 4; ++kk)
        wgmma_m64n64k16_bf16_ss<true, 1, 1>(dq, mn_major_step_descriptor(ds_rows.base, kk),
                                            mn_major_step_descriptor(k_rows, kk));
      wgmma_commit();
      wgmma_wait<0>();  // dV, dK and dQ_part
      wgmma_fence_operands(dq);
      wgmma_fence_operands(dk_acc);
      wgmma_fence_operands(dv_acc);
    }

    // dq[4j + e] is query row 16w + g + 8·(e / 2), dh column 8j + 2t + (e % 2) of the tile.
    constexpr int kOwnGroups = 8 / kWarpgroups;  // accumulator groups j whose columns this warpgroup adds
    float own[kOwnGroups][4];
    if constexpr (kWarpgroups == 2) {
      // Warpgroup 0 adds dh 0..31 (groups j < 4), warpgroup 1 dh 32..63. Each writes the other half
      // of its part to exchange[sender][jj][warp][lane] (float4: elements e of group j = jj + 4·owner),
      // the thread of the same warp and lane in the other warpgroup holds the same rows and columns.
      const int other = warpgroup ^ 1;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int send = 4 * jj;  // group other·4 + jj, selected without a run-time register index
        const float4 v = other == 0 ? make_float4(dq[send], dq[send + 1], dq[send + 2], dq[send + 3])
                                    : make_float4(dq[16 + send], dq[16 + send + 1], dq[16 + send + 2], dq[16 + send + 3]);
        exchange[((warpgroup * 4 + jj) * 4 + wg_warp) * 32 + lane] = v;
      }
      __syncthreads();  // (also: every warpgroup is done with this query buffer before the next load)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float4 v = exchange[((other * 4 + jj) * 4 + wg_warp) * 32 + lane];
        const int keep = 4 * jj;
        own[jj][0] = (warpgroup == 0 ? dq[keep] : dq[16 + keep]) + v.x;
        own[jj][1] = (warpgroup == 0 ? dq[keep + 1] : dq[16 + keep + 1]) + v.y;
        own[jj][2] = (warpgroup == 0 ? dq[keep + 2] : dq[16 + keep + 2]) + v.z;
        own[jj][3] = (warpgroup == 0 ? dq[keep + 3] : dq[16 + keep + 3]) + v.w;
      }
    } else {
      __syncthreads();  // every warp is done with this query buffer before the next load into it
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) own[j][e] = dq[4 * j + e];
      }
    }
    const int tile_row0 = q_start + wg_warp * 16;  // segment-local first query of this warp's rows
    const int own_col0 = kWarpgroups == 2 ? 32 * warpgroup : 0;
    add_dq_rows<kOwnGroups>(p, own, seg.start + tile_row0, seg.length - tile_row0, head, own_col0, lane);
  }

  // dK (scale already in dS) and dV of the warpgroup's keys: element 4j + e is key row
  // 16w + g + 8·(e / 2), dh column 8j + 2t + (e % 2).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = thread_key0 + r * 8;
    if (key >= seg.length) continue;
    const int64_t offset =
        static_cast<int64_t>(seg.start + key) * p.kv_row_stride + kv_head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<uint32_t*>(p.dk + offset + 8 * j) = pack_bf16(dk_acc[4 * j + 2 * r], dk_acc[4 * j + 2 * r + 1]);
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
  dim3 grid(segment_tile_grid(shape, 64 * kWarpgroups), shape.num_kv_heads);
  attention_backward_wgmma_kernel<kWarpgroups><<<grid, kWarpgroups * 128, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_attention_backward_wgmma(const AttentionBackwardParams& p, const AttentionShape& shape, int warps,
                                     cudaStream_t stream) {
  PG_CUDA_REQUIRE(warps == 4 || warps == 8, "attention_backward: tuning.backward_warps must be 4 or 8");
  require_hopper("attention_backward: the wgmma kernel needs an sm_90 (Hopper) GPU");
  if (warps == 4) launch<1>(p, shape, stream);
  else launch<2>(p, shape, stream);
}

}  // namespace pgolf::cuda::attention_detail
