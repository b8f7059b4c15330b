// Flash attention backward. Three kernels:
//   prepare:  D = rowsum(dO ∘ O) per (token, head) and a zeroed fp32 dQ accumulator;
//   main:     one block per (key tile, KV head); each warp owns 16 keys, holds their K and V as
//             mma A fragments and their dK, dV accumulators in registers, and walks every query
//             tile at or after its keys for each query head of the group. It computes the
//             transposed products (keys as rows) so that Pᵀ and dSᵀ feed dV += Pᵀ dO and
//             dK += dSᵀ Q straight from registers:
//               Sᵀ = K Qᵀ, Pᵀ = exp(scale·Sᵀ − LSE), dPᵀ = V dOᵀ, dSᵀ = scale · Pᵀ ∘ (dPᵀ − D);
//             dSᵀ also goes to shared memory, from where the block computes dQ_tile = dS K and adds
//             it to the fp32 accumulator with vector atomics;
//   finish:   dQ = bf16(accumulator), or left to the consumer (attention_backward_unfinished).
// AttentionTuning::backward_kernel = wgmma or wgmma_ws swaps the main kernel for a Hopper one
// (attention_backward_wgmma.cu, attention_backward_ws.cu; same workspace and semantics); the deterministic path keeps this
// file's kernel without atomics and the separate dQ pass (attention_dq.cu).
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"

namespace pgolf::cuda {
namespace {

using namespace attention_detail;

constexpr int kBackwardBlockM = 64;  // queries per tile


// The wgmma main kernel's work list (AttentionBackwardParams::tile_schedule) for key tiles of
// block_n keys, by one block. A key tile's work, the query tiles at and after it, shrinks with its
// index within the segment, and blocks start roughly in index order: listing every segment's tile 0,
// then every tile 1, ... starts the longest blocks first and leaves the short ones for the tail
// (dense T 2048 on an H100, three warpgroups: 1.98 → 1.86 ms for the whole backward). Used for
// 192-key blocks only: with 64 or 128 keys (3 or 1 blocks per multiprocessor, every block reading
// its segment's Q and dO) the order that keeps a segment's key tiles together is much faster
// (2.18 against 4.66 ms, 2.02 against 2.44), presumably by L2 reuse of those reads. The
// warp-specialized kernel (attention_backward_ws.cu) also takes that order, for the same reason.
// Counting sort by tile index; the order of the segments within one index is immaterial (each block
// writes only its own dK, dV rows). schedule[0] = {count, 0}, count -1 when a segment has more than
// kMaxScheduleTiles tiles.
__device__ void build_tile_schedule(const int32_t* __restrict__ cu, int num_segments, int block_n,
                                    int2* __restrict__ schedule) {
  __shared__ int next_slot[kMaxScheduleTiles];  // per tile index: a count, then the next free entry
  __shared__ int max_tiles;
  const int tid = threadIdx.x;
  for (int t = tid; t < kMaxScheduleTiles; t += blockDim.x) next_slot[t] = 0;
  if (tid == 0) max_tiles = 0;
  __syncthreads();
  int most = 0;
  for (int s = tid; s < num_segments; s += blockDim.x) {
    const int tiles = (cu[s + 1] - cu[s] + block_n - 1) / block_n;
    most = max(most, tiles);
    for (int t = 0; t < min(tiles, kMaxScheduleTiles); ++t) atomicAdd(&next_slot[t], 1);
  }
  atomicMax(&max_tiles, most);
  __syncthreads();
  if (max_tiles > kMaxScheduleTiles) {
    if (tid == 0) schedule[0] = make_int2(-1, 0);
    return;
  }
  if (tid == 0) {  // exclusive prefix sum over the tile indices
    int count = 0;
    for (int t = 0; t < max_tiles; ++t) {
      const int c = next_slot[t];
      next_slot[t] = count;
      count += c;
    }
    schedule[0] = make_int2(count, 0);
  }
  __syncthreads();
  for (int s = tid; s < num_segments; s += blockDim.x) {
    const int tiles = (cu[s + 1] - cu[s] + block_n - 1) / block_n;
    for (int t = 0; t < tiles; ++t) schedule[1 + atomicAdd(&next_slot[t], 1)] = make_int2(s, t);
  }
}

// Eight threads per (token, head) row, 8 elements (16 bytes) each. Block 0 also writes the wgmma
// kernel's work list for key tiles of schedule_block_n keys, or with 0 an empty one (count -1).
// With compute_delta false, D is already in place (attention_backward_delta): only dQ is zeroed.
__global__ void attention_backward_prepare_kernel(const __nv_bfloat16* __restrict__ o,
                                                  const __nv_bfloat16* __restrict__ d_o, float* __restrict__ delta,
                                                  bool compute_delta, float* __restrict__ dq_accum, int total_tokens,
                                                  int num_heads, const int32_t* __restrict__ cu, int num_segments,
                                                  int schedule_block_n, int2* __restrict__ tile_schedule) {
  if (blockIdx.x == 0) {
    if (schedule_block_n > 0) build_tile_schedule(cu, num_segments, schedule_block_n, tile_schedule);
    else if (threadIdx.x == 0) tile_schedule[0] = make_int2(-1, 0);
  }
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = thread >> 3;
  const int part = static_cast<int>(thread & 7);
  const bool active = row < static_cast<int64_t>(total_tokens) * num_heads;
  float sum = 0.f;
  if (active && !compute_delta) {
    float4* acc = reinterpret_cast<float4*>(dq_accum + row * kHeadDim + part * 8);
    acc[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (!compute_delta) return;
  if (active) {
    const int64_t offset = row * kHeadDim + part * 8;
    const uint4 ov = *reinterpret_cast<const uint4*>(o + offset);
    const uint4 gv = *reinterpret_cast<const uint4*>(d_o + offset);
    const __nv_bfloat162* op = reinterpret_cast<const __nv_bfloat162*>(&ov);
    const __nv_bfloat162* gp = reinterpret_cast<const __nv_bfloat162*>(&gv);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = __bfloat1622float2(op[i]), b = __bfloat1622float2(gp[i]);
      sum = fmaf(a.x, b.x, fmaf(a.y, b.y, sum));
    }
    float4* acc = reinterpret_cast<float4*>(dq_accum + offset);
    acc[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (active && part == 0) {
    const int64_t token = row / num_heads, head = row % num_heads;
    delta[head * total_tokens + token] = sum;
  }
}

// dq = bf16(scale · accumulator): the wgmma kernel leaves the softmax scale (a power of two) out of
// dS, the mma.sync one does not (scale 1).
__global__ void attention_backward_finish_kernel(const float* __restrict__ dq_accum, __nv_bfloat16* __restrict__ dq,
                                                 int64_t count, float scale) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= count) return;
  const float4 a = *reinterpret_cast<const float4*>(dq_accum + i);
  const float4 b = *reinterpret_cast<const float4*>(dq_accum + i + 4);
  const uint4 packed{pack_bf16(scale * a.x, scale * a.y), pack_bf16(scale * a.z, scale * a.w),
                     pack_bf16(scale * b.x, scale * b.y), pack_bf16(scale * b.z, scale * b.w)};
  *reinterpret_cast<uint4*>(dq + i) = packed;
}

template <int kWarps>
constexpr int backward_smem_bytes() {
  // K, V (later dSᵀ) tiles of 16·kWarps keys; Q and dO tiles of 64 queries, two buffers each;
  // LSE and D for 64 queries, two buffers each.
  return 2 * 16 * kWarps * 128 + 4 * kBackwardBlockM * 128 + 4 * kBackwardBlockM * 4;
}

__device__ __forceinline__ void store_shared_u32(uint32_t address, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(value));
}

// 8 warps per multiprocessor (one block of 8 warps or two of 4): up to 255 registers a thread, as
// K, V, dK and dV stay in registers. kAtomicDq = false leaves dQ to the deterministic pass.
template <int kWarps, bool kAtomicDq>
__global__ void __launch_bounds__(kWarps * 32, 8 / kWarps) attention_backward_kernel(const AttentionBackwardParams p) {
  constexpr int kThreads = kWarps * 32, kBlockN = 16 * kWarps, kBlockM = kBackwardBlockM;
  constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;
  static_assert(kThreads >= 2 * kBlockM, "LSE and D rows are copied by one thread each");
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kv_head = blockIdx.y;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockN);
  if (!seg.valid) return;
  const int key_start = seg.tile * kBlockN;  // segment-local
  const int first_q_tile = key_start / kBlockM;
  const int q_tiles_per_head = (seg.length + kBlockM - 1) / kBlockM - first_q_tile;
  const int iterations = p.group * q_tiles_per_head;

  const uint32_t smem_base = smem_address(smem);
  const SwizzledTile64 k_tile{smem_base};
  const SwizzledTile64 ds_tile{smem_base + kBlockN * 128};  // V until its fragments are in registers
  const uint32_t q_base = smem_base + 2 * kBlockN * 128;
  auto q_tile = [&](int buf) { return SwizzledTile64{q_base + static_cast<uint32_t>(buf * 2 * kBlockM * 128)}; };
  auto do_tile = [&](int buf) {
    return SwizzledTile64{q_base + static_cast<uint32_t>((buf * 2 + 1) * kBlockM * 128)};
  };
  float* const stats = reinterpret_cast<float*>(smem + 2 * kBlockN * 128 + 4 * kBlockM * 128);
  auto lse_rows = [&](int buf) { return stats + buf * 2 * kBlockM; };
  auto delta_rows = [&](int buf) { return stats + (buf * 2 + 1) * kBlockM; };

  auto head_of = [&](int it) { return kv_head * p.group + it / q_tiles_per_head; };
  auto q_start_of = [&](int it) { return (first_q_tile + it % q_tiles_per_head) * kBlockM; };
  auto load_queries = [&](int it, int buf) {
    const int head = head_of(it), q_start = q_start_of(it);
    const int rows = min(kBlockM, seg.length - q_start);
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

  {
    const int64_t offset = static_cast<int64_t>(seg.start + key_start) * p.kv_row_stride + kv_head * kHeadDim;
    const int rows = seg.length - key_start;
    k_tile.load_async<kBlockN, kThreads>(p.k + offset, p.kv_row_stride, rows, tid);
    ds_tile.load_async<kBlockN, kThreads>(p.v + offset, p.kv_row_stride, rows, tid);
    cp_async_commit();
  }
  load_queries(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // K and V have landed
  __syncthreads();

  // The warp's 16 keys as A fragments (rows = keys, k = head dim).
  uint32_t k_frag[4][4], v_frag[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    ldmatrix_x4(k_frag[kk], a_fragment_address(k_tile, warp * 16, kk * 16, lane));
    ldmatrix_x4(v_frag[kk], a_fragment_address(ds_tile, warp * 16, kk * 16, lane));
  }
  float dk_acc[8][4] = {}, dv_acc[8][4] = {};
  const int warp_key0 = key_start + warp * 16;  // segment-local first key of this warp

  // dQ: warp w computes query rows 16·(w % 4) .. +15 and kDqCols head-dim columns from col0.
  constexpr int kDqCols = 64 / (kWarps / 4);
  const int dq_row0 = (warp & 3) * 16, dq_col0 = (warp >> 2) * kDqCols;

  for (int it = 0; it < iterations; ++it) {
    const int buf = it & 1;
    if (it + 1 < iterations) load_queries(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this iteration's queries have landed
    __syncthreads();     // ... for every thread; and the previous dQ is done reading dSᵀ
    const int head = head_of(it), q_start = q_start_of(it);
    const SwizzledTile64 qt = q_tile(buf), dot = do_tile(buf);

    if (warp_key0 <= q_start + kBlockM - 1) {  // some query of the tile sees a key of this warp
      // Sᵀ and dPᵀ: 16 keys x 64 queries.
      float s[8][4] = {}, dp[8][4] = {};
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, b_pair_address(qt, np * 16, kk * 16, lane));
          mma_bf16(s[2 * np], k_frag[kk], b[0], b[1]);
          mma_bf16(s[2 * np + 1], k_frag[kk], b[2], b[3]);
          ldmatrix_x4(b, b_pair_address(dot, np * 16, kk * 16, lane));
          mma_bf16(dp[2 * np], v_frag[kk], b[0], b[1]);
          mma_bf16(dp[2 * np + 1], v_frag[kk], b[2], b[3]);
        }
      }
      // Pᵀ (in s) and dSᵀ (in dp); keys after a query, and queries past the segment, give 0.
      const float* lse_s = lse_rows(buf);
      const float* delta_s = delta_rows(buf);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * (lane & 3) + (e & 1);
          const int query = q_start + qi;
          const int key = warp_key0 + (lane >> 2) + (e >> 1) * 8;
          const bool visible = key <= query && query < seg.length;
          const float prob = visible ? exp2_approx(fmaf(s[nt][e], kScaleLog2, -lse_s[qi] * kLog2e)) : 0.f;
          s[nt][e] = prob;
          dp[nt][e] = prob * (dp[nt][e] - delta_s[qi]) * kSoftmaxScale;
        }
      }
      // dV += Pᵀ dO, dK += dSᵀ Q (A from registers: rows = keys, k = queries).
#pragma unroll
      for (int kq = 0; kq < 4; ++kq) {
        const uint32_t pa[4] = {pack_bf16(s[2 * kq][0], s[2 * kq][1]), pack_bf16(s[2 * kq][2], s[2 * kq][3]),
                                pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]),
                                pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3])};
        const uint32_t da[4] = {pack_bf16(dp[2 * kq][0], dp[2 * kq][1]), pack_bf16(dp[2 * kq][2], dp[2 * kq][3]),
                                pack_bf16(dp[2 * kq + 1][0], dp[2 * kq + 1][1]),
                                pack_bf16(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
        for (int dpair = 0; dpair < 4; ++dpair) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, b_pair_trans_address(dot, kq * 16, dpair * 16, lane));
          mma_bf16(dv_acc[2 * dpair], pa, b[0], b[1]);
          mma_bf16(dv_acc[2 * dpair + 1], pa, b[2], b[3]);
          ldmatrix_x4_trans(b, b_pair_trans_address(qt, kq * 16, dpair * 16, lane));
          mma_bf16(dk_acc[2 * dpair], da, b[0], b[1]);
          mma_bf16(dk_acc[2 * dpair + 1], da, b[2], b[3]);
        }
      }
      // dSᵀ rows of this warp → shared memory (bf16, the same rounding as the dK product used).
      if constexpr (kAtomicDq) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int r = 0; r < 2; ++r)
            store_shared_u32(ds_tile.pair_address(warp * 16 + (lane >> 2) + r * 8, nt * 8 + 2 * (lane & 3)),
                             pack_bf16(dp[nt][2 * r], dp[nt][2 * r + 1]));
        }
      }
    } else if constexpr (kAtomicDq) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          store_shared_u32(ds_tile.pair_address(warp * 16 + (lane >> 2) + r * 8, nt * 8 + 2 * (lane & 3)), 0u);
      }
    }
    __syncthreads();  // (also: every warp is done with this query buffer before the next load into it)
    if constexpr (!kAtomicDq) continue;

    // dQ_tile[64 x 64] = dS [queries x keys] · K [keys x head dim]; dS read transposed from dSᵀ.
    float dq[kDqCols / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, a_fragment_trans_address(ds_tile, kk * 16, dq_row0, lane));
#pragma unroll
      for (int np = 0; np < kDqCols / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, b_pair_trans_address(k_tile, kk * 16, dq_col0 + np * 16, lane));
        mma_bf16(dq[2 * np], a, b[0], b[1]);
        mma_bf16(dq[2 * np + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = q_start + dq_row0 + (lane >> 2) + r * 8;
      if (query >= seg.length) continue;
      float* dst = p.dq_accum + static_cast<int64_t>(seg.start + query) * p.q_row_stride + head * kHeadDim +
                   dq_col0 + 2 * (lane & 3);
#pragma unroll
      for (int nt = 0; nt < kDqCols / 8; ++nt)
        atomicAdd(reinterpret_cast<float2*>(dst + nt * 8), make_float2(dq[nt][2 * r], dq[nt][2 * r + 1]));
    }
  }

  // dK (scale already in dS) and dV of the warp's keys.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = warp_key0 + (lane >> 2) + r * 8;
    if (key >= seg.length) continue;
    const int64_t offset = static_cast<int64_t>(seg.start + key) * p.kv_row_stride + kv_head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      *reinterpret_cast<uint32_t*>(p.dk + offset + nt * 8) = pack_bf16(dk_acc[nt][2 * r], dk_acc[nt][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(p.dv + offset + nt * 8) = pack_bf16(dv_acc[nt][2 * r], dv_acc[nt][2 * r + 1]);
    }
  }
}

template <int kWarps, bool kAtomicDq>
void launch_backward(const AttentionBackwardParams& p, const AttentionShape& shape, cudaStream_t stream) {
  constexpr int bytes = backward_smem_bytes<kWarps>();
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_kernel<kWarps, kAtomicDq>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  dim3 grid(segment_tile_grid(shape, 16 * kWarps), shape.num_kv_heads);
  attention_backward_kernel<kWarps, kAtomicDq><<<grid, kWarps * 32, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

template <bool kAtomicDq>
void launch_backward(const AttentionBackwardParams& p, const AttentionShape& shape, int warps, cudaStream_t stream) {
  switch (warps) {
    case 4: launch_backward<4, kAtomicDq>(p, shape, stream); break;
    case 8: launch_backward<8, kAtomicDq>(p, shape, stream); break;
    default: PG_CUDA_REQUIRE(false, "attention_backward: tuning.backward_warps must be 4 or 8");
  }
}

size_t dq_accum_bytes(const AttentionShape& s) {
  return static_cast<size_t>(s.total_tokens) * s.num_heads * kHeadDim * sizeof(float);
}

// D, rounded up to 16 bytes (the work list after it has 8-byte entries).
size_t delta_bytes(const AttentionShape& s) {
  return (static_cast<size_t>(s.total_tokens) * s.num_heads * sizeof(float) + 15) / 16 * 16;
}

}  // namespace

// The fp32 dQ accumulator, D, and the wgmma kernel's work list (8-byte entries).
size_t attention_backward_workspace_bytes(const AttentionShape& shape) {
  return dq_accum_bytes(shape) + delta_bytes(shape) + tile_schedule_entries(shape) * sizeof(int2);
}

float* attention_backward_delta(const AttentionShape& shape, void* workspace) {
  return reinterpret_cast<float*>(static_cast<char*>(workspace) + dq_accum_bytes(shape));
}

namespace {

// Checks the arguments, runs the prepare kernel (D, the zeroed dQ accumulator, the wgmma work list)
// and returns the main kernels' parameters over the workspace.
AttentionBackwardParams prepare_backward(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                         const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse,
                                         const __nv_bfloat16* d_o, __nv_bfloat16* dk, __nv_bfloat16* dv,
                                         void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                         const AttentionTuning& tuning, bool delta_ready) {
  PG_CUDA_REQUIRE(shape.query_begin == nullptr,
                  "attention_backward: shape.query_begin is for the forward only (a backward needs every query)");
  check_aligned16(q, "attention_backward: q must be a 16-byte aligned device pointer");
  check_aligned16(k, "attention_backward: k must be a 16-byte aligned device pointer");
  check_aligned16(v, "attention_backward: v must be a 16-byte aligned device pointer");
  check_aligned16(o, "attention_backward: o must be a 16-byte aligned device pointer");
  check_aligned16(d_o, "attention_backward: d_o must be a 16-byte aligned device pointer");
  check_aligned16(dk, "attention_backward: dk must be a 16-byte aligned device pointer");
  check_aligned16(dv, "attention_backward: dv must be a 16-byte aligned device pointer");
  check_aligned16(workspace, "attention_backward: workspace must be a 16-byte aligned device pointer");
  PG_CUDA_REQUIRE(lse != nullptr, "attention_backward: lse must be given");
  PG_CUDA_REQUIRE(workspace_bytes >= attention_backward_workspace_bytes(shape),
                  "attention_backward: workspace smaller than attention_backward_workspace_bytes(shape)");

  float* dq_accum = static_cast<float*>(workspace);
  float* delta = attention_backward_delta(shape, workspace);
  int2* tile_schedule =
      reinterpret_cast<int2*>(static_cast<char*>(workspace) + dq_accum_bytes(shape) + delta_bytes(shape));
  int schedule_keys = 0;  // the wgmma kernels' work list (none for the mma.sync kernel)
  if (!tuning.deterministic && tuning.backward_kernel == AttentionBackwardKernel::wgmma)
    schedule_keys = attention_backward_wgmma_schedule_keys(tuning.backward_warps);
  if (!tuning.deterministic && tuning.backward_kernel == AttentionBackwardKernel::wgmma_ws)
    schedule_keys = attention_backward_ws_schedule_keys(tuning.backward_warps);
  const int64_t rows = static_cast<int64_t>(shape.total_tokens) * shape.num_heads;
  const int threads = 256;
  const int64_t blocks = (rows * 8 + threads - 1) / threads;
  attention_backward_prepare_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      o, d_o, delta, !delta_ready, dq_accum, shape.total_tokens, shape.num_heads, shape.cu_seqlens,
      shape.num_segments, schedule_keys, tile_schedule);
  PG_CUDA_LAUNCH_CHECK();
  return AttentionBackwardParams{attention_layout(shape), q, k, v, d_o, lse, delta, dq_accum, tile_schedule, dk, dv};
}

// The atomic main kernel (dK, dV, dQ summed into the accumulator); not the deterministic path.
DqSum launch_backward_atomic(const AttentionBackwardParams& p, const AttentionShape& shape,
                             const AttentionTuning& tuning, cudaStream_t stream) {
  switch (tuning.backward_kernel) {
    case AttentionBackwardKernel::wgmma: launch_attention_backward_wgmma(p, shape, tuning.backward_warps, stream); break;
    case AttentionBackwardKernel::wgmma_ws: launch_attention_backward_ws(p, shape, tuning.backward_warps, stream); break;
    case AttentionBackwardKernel::mma_sync: launch_backward<true>(p, shape, tuning.backward_warps, stream); break;
  }
  // The Hopper kernels leave the softmax scale out of dS (attention_backward_finish_kernel).
  const bool hopper = tuning.backward_kernel != AttentionBackwardKernel::mma_sync;
  return DqSum{p.dq_accum, hopper ? kSoftmaxScale : 1.f};
}

}  // namespace

void attention_backward(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse, const __nv_bfloat16* d_o,
                        __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream, const AttentionTuning& tuning,
                        bool delta_ready) {
  check_attention_shape(shape);
  if (shape.total_tokens == 0) return;
  check_aligned16(dq, "attention_backward: dq must be a 16-byte aligned device pointer");
  const AttentionBackwardParams p =
      prepare_backward(shape, q, k, v, o, lse, d_o, dk, dv, workspace, workspace_bytes, stream, tuning, delta_ready);
  if (tuning.deterministic) {
    launch_backward<false>(p, shape, tuning.backward_warps, stream);
    launch_attention_dq(shape, q, k, v, d_o, lse, p.delta, dq, stream);
    return;
  }
  const DqSum dq_sum = launch_backward_atomic(p, shape, tuning, stream);
  const int threads = 256;
  const int64_t count = static_cast<int64_t>(shape.total_tokens) * shape.num_heads * kHeadDim;
  const int64_t blocks = (count / 8 + threads - 1) / threads;
  attention_backward_finish_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(dq_sum.sum, dq, count,
                                                                                          dq_sum.scale);
  PG_CUDA_LAUNCH_CHECK();
}

DqSum attention_backward_unfinished(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                    const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse,
                                    const __nv_bfloat16* d_o, __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream, const AttentionTuning& tuning,
                                    bool delta_ready) {
  PG_CUDA_REQUIRE(!tuning.deterministic,
                  "attention_backward_unfinished: the deterministic backward writes bf16 dq itself "
                  "(call attention_backward)");
  check_attention_shape(shape);
  if (shape.total_tokens == 0) return DqSum{static_cast<const float*>(workspace), 1.f};
  const AttentionBackwardParams p =
      prepare_backward(shape, q, k, v, o, lse, d_o, dk, dv, workspace, workspace_bytes, stream, tuning, delta_ready);
  return launch_backward_atomic(p, shape, tuning, stream);
}

}  // namespace pgolf::cuda
