// Fused MLP products on Hopper's warpgroup MMA (wgmma, sm_90a); mlp_gemm.h states what they compute.
//
// One CTA of 2 consumer warpgroups, a drain warpgroup and a producer warp owns 128 rows of the input
// (A = m or df, [rows, 512]) and sweeps the 128-column tiles of the hidden dimension: all of them, or
// with few rows (fewer CTAs than make whole waves on the multiprocessors) one of gridDim.y runs of
// consecutive tiles (hidden_splits in mlp_gemm.h; every tile's MMAs the same, so the same bits). Two schedules
// feed the MMAs (MlpSchedule), with the same instructions in the same order, so the same results:
//   streamed operands: every step's 128 x 64 k-slice of A (L2-resident after the first tile) and of B
//     (the weight, L2-resident) stream through 6 stages of 32 KB;
//   resident A: A is read from global memory once, its eight 128 x 64 k-slices (128 KB) staying in
//     shared memory for the whole sweep, and B streams through 4 stages of 16 KB.
// Two CTAs form a cluster and share B's stream: each loads half of every slice with TMA and
// multicasts it to both, which halves what each SM pulls from L2. Each warpgroup computes its 64 rows x
// 128 columns with wgmma m64n128k16, both operands from 128-byte-swizzled tiles (wgmma.cuh; TMA's
// 128-byte swizzle writes exactly that layout): A K-major; B K-major in the forward (Wfc rows =
// hidden), MN-major in the backward (Wproj rows = k, stored as two 64-column tiles 8 KB apart).
//
// Pipeline (step s = 8j + k: tile j, k-step k; stage s % S of S stages). The producer thread waits
// until stage s % S is free in both CTAs (its `empty` barrier has the 16 arrivals of the 8 consumer
// warps of each CTA for step s - S), announces the step's bytes on the `full` barrier, and starts the
// copies: its half of B's slice (to both CTAs) and A's slice k (every step when streamed, in tile 0
// when resident). Consumers wait on `full`, issue the 4 MMAs of step s, and once those of step s - 1
// are done, free that stage in both CTAs.
//
// Epilogue per tile and consumer warpgroup, through a 64 x 128 bf16 staging tile of its own: when the
// tile's MMAs are done, its accumulators rounded to bf16 (pre in the forward, dpost in the backward)
// go to the staging tile at their fragment positions, and the drain warpgroup takes them out in
// 16-byte chunks (coalesced streaming stores, 8 per thread and consumer warpgroup) while the
// consumers compute the next tile; a named barrier pair per consumer warpgroup hands the staging tile
// over (staged) and back (drained).
// A chunk of the forward is written as pre and, activated, as post; one of the backward becomes dpre =
// bf16(dpost · f'(pre)) with pre's chunk (prefetched to L2 as the drain of the tile begins) loaded
// before the tile is staged. dpost itself is never written. The drain has warps of its own because
// the consumers' loop is latency-bound: with one chunk per thread drained in each k-step of the next
// tile, as this kernel first did, a warpgroup almost never waited for its previous MMAs but took
// about twice their time per step (the chunk's shared-memory load latency and ALU work in line with
// the MMA issue), and its own drain warps made the forward 11 % and the backward 14 % faster.
#include <cstdint>
#include <type_traits>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/qk_rope.cuh"
#include "backend/cuda/tensor_map.h"
#include "backend/cuda/tma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace pgolf::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kDim = 512;                  // K: the model width the kernels are built for
constexpr int kBlockM = 128;               // rows per CTA: two warpgroups of 64
constexpr int kBlockN = 128;               // hidden columns per tile
constexpr int kStepK = 64;                 // k per step: one 128-byte swizzled row
constexpr int kSteps = kDim / kStepK;      // k-steps per tile
constexpr int kResidentStages = 4;         // resident A: B stages in shared memory
constexpr int kStreamedStages = 6;         // streamed A: stages of (A slice, B slice), as many as fit
constexpr int kClusterSize = 2;            // CTAs sharing B's stream
constexpr int kConsumerThreads = 256;      // two warpgroups of MMAs
constexpr int kDrainThreads = 128;         // a warpgroup that writes the staged tiles out
constexpr int kThreads = kConsumerThreads + kDrainThreads + 32;  // and the producer warp
constexpr int kProducerWarp = kThreads / 32 - 1;
// Named barriers (0 is __syncthreads') between consumer warpgroup w and the drain warps: w's tile is
// staged (1 + w), the drain warps have read w's staged tile (3 + w).
constexpr int kStagedBarrier = 1, kDrainedBarrier = 3;
constexpr int kHandoffThreads = kConsumerThreads / 2 + kDrainThreads;
constexpr uint32_t kReleaseArrivals = kClusterSize * kConsumerThreads / 32;  // per step: every consumer warp
constexpr uint32_t kSliceBytes = kBlockM * 128;         // one A k-slice: 128 rows of 64 bf16
constexpr uint32_t kStageBytes = kBlockN * 128;         // one B k-slice: 128 x 64 bf16
constexpr uint32_t kHalfTileBytes = 64 * 128;           // 64 rows of 64 bf16: one TMA box of B
constexpr uint32_t kStagingBytes = 2 * kHalfTileBytes;  // a warpgroup's 64 x 128 bf16 output tile
constexpr uint32_t kAtomBytes = 1024;                   // swizzled tiles start on this (wgmma.cuh)
// Shared memory: resident A keeps A's 8 slices and 4 B stages; streamed A has 6 stages of one A and
// one B slice each. Then the two staging tiles, the full and empty mbarriers, and alignment slack.
template <bool kStreamA>
constexpr int kStageCount = kStreamA ? kStreamedStages : kResidentStages;
template <bool kStreamA>
constexpr uint32_t kOperandBytes =
    kStreamA ? kStreamedStages * (kSliceBytes + kStageBytes) : kSteps * kSliceBytes + kResidentStages * kStageBytes;
template <bool kStreamA>
constexpr int kSmemBytes = kOperandBytes<kStreamA> + 2 * kStagingBytes + 2 * kStageCount<kStreamA> * 8 + kAtomBytes;
static_assert(kSmemBytes<true> <= 227 * 1024 && kSmemBytes<false> <= 227 * 1024, "over Hopper's 227 KB per CTA");

// What the drain warpgroup makes of a staged tile.
enum class Epilogue {
  mlp_forward,   // pre and post = act(pre)
  mlp_backward,  // dpre = bf16(dpost · f'(pre))
  qkv_forward,   // qkv, and for the q and k heads QK-norm, RoPE and gain into q and k (qkv_gemm.h)
};

// The QKV product's epilogue: the q heads fill columns [0, q_cols), the k heads [q_cols, q_cols + k_cols)
// (both multiples of 128: whole tiles), v the rest. Head dimension 64.
struct QkvEpilogue {
  bf16* q;        // [rows, heads, 64]
  bf16* k;        // [rows, kv_heads, 64]
  float* q_rstd;  // [rows, heads]
  float* k_rstd;  // [rows, kv_heads]
  const float* gain;                        // [heads]
  const float* rope_cos;                    // [seq_len, half]
  const float* rope_sin;
  int q_cols, k_cols, heads, kv_heads, seq_len, half;
  bool write_qk_lin;  // the q and k columns of qkv too (the backward reads them); v's always
};

struct MlpGemmParams {
  CUtensorMap a_map;  // A [rows, 512], boxes of 128 rows x 64
  CUtensorMap b_map;  // Wfc [hidden, 512] or Wproj [512, hidden], boxes of 64 x 64
  const bf16* pre;    // backward: [rows, hidden]
  bf16* out;          // forward: pre; backward: dpre; qkv: qkv
  bf16* post;         // forward: post
  int64_t rows;
  int hidden;
  int tiles_per_split;  // hidden tiles of a CTA: blockIdx.y's run starts at tile blockIdx.y · tiles_per_split
  float slope;
  QkvEpilogue qkv;
};

__device__ __forceinline__ void st_shared_u32(uint32_t address, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(address)
               : "memory");
  return v;
}
// Named barrier `id` of `threads` threads: some arrive (and go on), the others wait for them.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The drains' global stores: st.global.cs (streaming: the lines are the first L2 evicts), so that the
// outputs, written once and read by a later kernel, leave L2 to A and the weight that the CTAs re-read.
__device__ __forceinline__ void store_streaming(bf16* dst, const uint4& v) { __stcs(reinterpret_cast<uint4*>(dst), v); }
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  uint4 raw;
  raw.x = pack_bf16(v[0], v[1]), raw.y = pack_bf16(v[2], v[3]);
  raw.z = pack_bf16(v[4], v[5]), raw.w = pack_bf16(v[6], v[7]);
  return raw;
}

// The drain of the QKV product's staged tile of consumer warpgroup wg: qkv's chunks as they are, and for
// a q or k tile each head vector normalized, rotated and scaled as qk_norm_rope_forward does, written to
// q or k with its rstd. A thread takes a pair of 8-element chunks of one head at a time, the chunks c and
// c + h8 of RoPE's pairs (h8 = half/8; 4 without RoPE), so that every rotation is local; the 4 lanes of
// a quad hold one head of one row. Bit for bit the separate pass: each chunk's sum of squares in its
// order, the head's total as that pass's butterfly over its 8 lanes forms it (((s0 + s4) + (s2 + s6)) +
// ((s1 + s5) + (s3 + s7)), the same on every lane), then the same products. The tile's kind is the same
// for the whole warpgroup; rows past the last compute on zeros and store nothing.
template <int kH8, bool kRope>
__device__ __forceinline__ void drain_qkv_tile(const MlpGemmParams& p, uint32_t staging0, uint32_t staging1, int t,
                                               int64_t row_base, int valid, int col0) {
  const QkvEpilogue& e = p.qkv;
  const bool is_q = col0 < e.q_cols, is_k = !is_q && col0 < e.q_cols + e.k_cols;
  if (!(is_q || is_k)) {
    const int chunk = t & 15;
    const SwizzledTile64 staging{chunk < 8 ? staging0 : staging1};
    bf16* const lin = p.out + row_base * p.hidden + col0 + chunk * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = (t >> 4) + 8 * i;
      const uint4 raw = ld_shared_v4(staging.chunk_address(row, chunk & 7));
      if (row < valid) store_streaming(lin + static_cast<int64_t>(row) * p.hidden, raw);
    }
    return;
  }
  // Item t + 128i: row (t >> 3) + 16i, head (t >> 2) & 1 of the tile, quad lane qq = t & 3.
  const int qq = t & 3, local_head = (t >> 2) & 1;
  const SwizzledTile64 staging{local_head == 0 ? staging0 : staging1};
  static_assert(kH8 == 1 || kH8 == 2 || kH8 == 4, "RoPE partners 8, 16 or 32 elements apart");
  constexpr int kLb = kH8 == 1 ? 0 : kH8 == 2 ? 1 : 2;  // the chunk-index bit that is local
  const int half = e.half;
  const int ca = ((qq >> kLb) << (kLb + 1)) | (qq & (kH8 - 1)), cb = ca + kH8;  // the pair's chunks
  const bool rotates = kRope && ca < kH8;
  const int head = (col0 - (is_q ? 0 : e.q_cols)) / 64 + local_head;
  const int heads = is_q ? e.heads : e.kv_heads;
  const float g = is_q ? e.gain[head] : 1.f;
  bf16* const out = (is_q ? e.q : e.k) + (row_base * heads + head) * 64;
  float* const rstd = (is_q ? e.q_rstd : e.k_rstd) + row_base * heads + head;
  bf16* const lin = p.out + row_base * p.hidden + col0 + local_head * 64;
  const uint32_t token0 = static_cast<uint32_t>(row_base + (t >> 3)), seq_len = static_cast<uint32_t>(e.seq_len);
  // One step of the separate pass's butterfly over the chunk index, bit kBit: x ← x + x of chunk c ^ kBit,
  // for both of this lane's chunks; the local bit adds the pair, another is a lane xor within the quad.
  auto step = [](float& xa, float& xb, auto bit) {
    constexpr int kBit = decltype(bit)::value;
    if constexpr (kBit == kH8) {
      const float sum_a = xa + xb, sum_b = xb + xa;
      xa = sum_a, xb = sum_b;
    } else {
      constexpr int kLaneXor = kBit < kH8 ? kBit : kBit / 2;  // the bit with the local one taken out
      xa += __shfl_xor_sync(0xffffffffu, xa, kLaneXor);
      xb += __shfl_xor_sync(0xffffffffu, xb, kLaneXor);
    }
  };
#pragma unroll 2
  for (int i = 0; i < 4; ++i) {
    const int row = (t >> 3) + 16 * i;
    const bool live = row < valid;
    float c[8] = {}, sn[8] = {};
    if (rotates) {
      const uint32_t pos = (token0 + 16u * i) % seq_len;
      load8(e.rope_cos + static_cast<int64_t>(pos) * half + 8 * ca, c);
      load8(e.rope_sin + static_cast<int64_t>(pos) * half + 8 * ca, sn);
    }
    const uint4 raw_a = ld_shared_v4(staging.chunk_address(row, ca));
    const uint4 raw_b = ld_shared_v4(staging.chunk_address(row, cb));
    if (live && e.write_qk_lin) {
      store_streaming(lin + static_cast<int64_t>(row) * p.hidden + 8 * ca, raw_a);
      store_streaming(lin + static_cast<int64_t>(row) * p.hidden + 8 * cb, raw_b);
    }
    float a[8], b[8];
    const uint32_t* ia = &raw_a.x;
    const uint32_t* ib = &raw_b.x;
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const float2 fa = unpack_bf16(ia[x]), fb = unpack_bf16(ib[x]);
      a[2 * x] = fa.x, a[2 * x + 1] = fa.y, b[2 * x] = fb.x, b[2 * x + 1] = fb.y;
    }
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int x = 0; x < 8; ++x) sa += a[x] * a[x];
#pragma unroll
    for (int x = 0; x < 8; ++x) sb += b[x] * b[x];
    step(sa, sb, std::integral_constant<int, 4>{});
    step(sa, sb, std::integral_constant<int, 2>{});
    step(sa, sb, std::integral_constant<int, 1>{});
    const float inv = qk_inv_rms_of_sum(sa, 64);
#pragma unroll
    for (int x = 0; x < 8; ++x) a[x] *= inv, b[x] *= inv;
    if (rotates) {
      float ra[8], rb[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) {
        ra[x] = rotated(a[x], b[x], c[x], sn[x], true);
        rb[x] = rotated(b[x], a[x], c[x], sn[x], false);
      }
#pragma unroll
      for (int x = 0; x < 8; ++x) a[x] = ra[x], b[x] = rb[x];
    }
#pragma unroll
    for (int x = 0; x < 8; ++x) a[x] *= g, b[x] *= g;
    if (live) {
      store_streaming(out + static_cast<int64_t>(row) * heads * 64 + 8 * ca, pack8(a));
      store_streaming(out + static_cast<int64_t>(row) * heads * 64 + 8 * cb, pack8(b));
      if (qq == 0) rstd[static_cast<int64_t>(row) * heads] = inv;
    }
  }
}

template <Epilogue kEpi, bool kStreamA>
__global__ void __cluster_dims__(kClusterSize, 1, 1) __launch_bounds__(kThreads, 1)
    mlp_fused_gemm_kernel(const __grid_constant__ MlpGemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBackward = kEpi == Epilogue::mlp_backward;
  extern __shared__ unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warpgroup = warp >> 2;
  const uint32_t cta_rank = cluster_cta_rank();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int valid_rows = static_cast<int>(max(int64_t{0}, min(static_cast<int64_t>(kBlockM), p.rows - row0)));
  // This CTA's run of hidden tiles: [tile0, tile0 + tiles); j below counts within it.
  const int tile0 = static_cast<int>(blockIdx.y) * p.tiles_per_split;
  const int tiles = min(p.tiles_per_split, p.hidden / kBlockN - tile0), steps = tiles * kSteps;

  constexpr int kStages = kStageCount<kStreamA>;
  const uint32_t base = (smem_address(smem) + (kAtomBytes - 1)) & ~(kAtomBytes - 1);
  // Streamed A: stage st holds A's slice at base + st·32 KB and B's 16 KB after it. Resident A: the
  // 8 A slices first, then the 4 B stages.
  constexpr uint32_t kStageStride = kStreamA ? kSliceBytes + kStageBytes : kStageBytes;
  const uint32_t stages = kStreamA ? base : base + kSteps * kSliceBytes;
  auto stage_base = [&](int s) { return stages + static_cast<uint32_t>(s % kStages) * kStageStride; };
  auto a_slice = [&](int s) {  // A's slice of step s (k-step s % 8)
    return SwizzledTile64{kStreamA ? stage_base(s) : base + static_cast<uint32_t>(s % kSteps) * kSliceBytes};
  };
  auto stage = [&](int s) { return stage_base(s) + (kStreamA ? kSliceBytes : 0); };  // B's slice of step s
  auto staging_half = [&](int wg, int half) {  // consumer warpgroup wg's staging tile, columns 64·half..
    return SwizzledTile64{base + kOperandBytes<kStreamA> + wg * kStagingBytes + half * kHalfTileBytes};
  };
  const uint32_t barriers = base + kOperandBytes<kStreamA> + 2 * kStagingBytes;
  auto full = [&](int s) { return barriers + static_cast<uint32_t>(s % kStages) * 8; };
  auto empty = [&](int s) { return barriers + static_cast<uint32_t>(kStages + s % kStages) * 8; };

  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbarrier_init(full(st), 1);
      mbarrier_init(empty(st), kReleaseArrivals);
    }
    fence_mbarrier_init_cluster();
  }
  cluster_sync();  // both CTAs' barriers exist before any copy or arrival targets them

  if (warp == kProducerWarp) {
    if (lane == 0) {
      for (int s = 0; s < steps; ++s) {
        const int j = s / kSteps, k = s % kSteps;
        if (s >= kStages) mbarrier_wait(empty(s), ((s / kStages) & 1) ^ 1);  // step s - kStages released everywhere
        const bool load_a = kStreamA || s < kSteps;
        mbarrier_arrive_expect_tx(full(s), kStageBytes + (load_a ? kSliceBytes : 0));
        if (load_a) tma_load_2d(a_slice(s).base, &p.a_map, k * kStepK, static_cast<int>(row0), full(s));
        // This CTA's half of B's slice: Wfc rows (= n) 128j + 64·rank.., or Wproj columns (= n) there.
        const uint32_t half = stage(s) + cta_rank * kHalfTileBytes;
        const int n = (tile0 + j) * kBlockN + static_cast<int>(cta_rank) * 64;
        if constexpr (!kBackward) tma_load_2d_multicast(half, &p.b_map, k * kStepK, n, full(s), 0x3);
        else tma_load_2d_multicast(half, &p.b_map, n, k * kStepK, full(s), 0x3);
      }
    }
    __syncwarp();
  } else if (warp >= kConsumerThreads / 32) {
    // Chunk i (of 8 per thread) of warpgroup wg's 64 x 128 tile, drained by thread t of 128: 16 chunks
    // of 16 bytes per row, so 16 threads cover one row's 256 contiguous bytes. Its global offset in
    // tile j; -1 past the last row.
    auto chunk_offset = [&](int wg, int t, int j, int i) -> int64_t {
      const int chunk_index = t + i * 128, row = chunk_index >> 4, chunk = chunk_index & 15;
      if (row >= valid_rows - 64 * wg) return -1;
      return (row0 + 64 * wg + row) * p.hidden + (tile0 + j) * kBlockN + chunk * 8;
    };
    auto load_pre = [&](int wg, int t, int j, int i) {
      const int64_t offset = chunk_offset(wg, t, j, i);
      return offset >= 0 ? __ldg(reinterpret_cast<const uint4*>(p.pre + offset)) : uint4{};
    };
    // Chunk i of warpgroup wg's staged tile j to global memory: the forward writes pre and post =
    // act(pre), the backward dpre = bf16(dpost · f'(pre)) — the element math of the separate passes
    // (activation.cuh).
    const float slope_sq = p.slope * p.slope;
    auto drain_chunk = [&](int wg, int t, int j, int i, const uint4& pre_value) {
      const int64_t offset = chunk_offset(wg, t, j, i);
      if (offset < 0) return;
      const int chunk_index = t + i * 128, row = chunk_index >> 4, chunk = chunk_index & 15;
      const uint4 v = ld_shared_v4(staging_half(wg, chunk >> 3).chunk_address(row, chunk & 7));
      const uint32_t* in = &v.x;
      uint4 result;
      uint32_t* out = &result.x;
      if constexpr (!kBackward) {
        if (p.out) store_streaming(p.out + offset, v);  // pre: null when no backward follows
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 x = unpack_bf16(in[e]);
          out[e] = pack_bf16(leaky_relu_sq_value(x.x, p.slope), leaky_relu_sq_value(x.y, p.slope));
        }
        store_streaming(p.post + offset, result);
      } else {
        const uint32_t* pre = &pre_value.x;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 d = unpack_bf16(in[e]), x = unpack_bf16(pre[e]);
          out[e] = pack_bf16(leaky_relu_sq_gradient(d.x, x.x, slope_sq), leaky_relu_sq_gradient(d.y, x.y, slope_sq));
        }
        store_streaming(p.out + offset, result);
      }
    };
    // Tile j of each consumer warpgroup once it is staged, while the consumers compute tile j + 1.
    // The backward's pre chunks of the tile are prefetched to L2 before the waits, and each
    // warpgroup's 8 loaded before its own.
    const int t = tid - kConsumerThreads;
    if constexpr (kEpi == Epilogue::qkv_forward) {
      for (int j = 0; j < tiles; ++j) {
#pragma unroll
        for (int wg = 0; wg < 2; ++wg) {
          named_barrier_sync(kStagedBarrier + wg, kHandoffThreads);
          const uint32_t s0 = staging_half(wg, 0).base, s1 = staging_half(wg, 1).base;
          const int64_t rb = row0 + 64 * wg;
          const int valid = valid_rows - 64 * wg, col0 = (tile0 + j) * kBlockN;
          switch (p.qkv.half) {
            case 8: drain_qkv_tile<1, true>(p, s0, s1, t, rb, valid, col0); break;
            case 16: drain_qkv_tile<2, true>(p, s0, s1, t, rb, valid, col0); break;
            case 32: drain_qkv_tile<4, true>(p, s0, s1, t, rb, valid, col0); break;
            default: drain_qkv_tile<4, false>(p, s0, s1, t, rb, valid, col0); break;  // no RoPE (checked)
          }
          if (j + 1 < tiles) named_barrier_arrive(kDrainedBarrier + wg, kHandoffThreads);
        }
      }
    } else {
    for (int j = 0; j < tiles; ++j) {
      if constexpr (kBackward) {
#pragma unroll
        for (int wg = 0; wg < 2; ++wg)
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int64_t offset = chunk_offset(wg, t, j, i);
            if (offset >= 0) prefetch_l2(p.pre + offset);
          }
      }
#pragma unroll
      for (int wg = 0; wg < 2; ++wg) {
        uint4 pre_chunk[8];
        if constexpr (kBackward) {
#pragma unroll
          for (int i = 0; i < 8; ++i) pre_chunk[i] = load_pre(wg, t, j, i);
        }
        named_barrier_sync(kStagedBarrier + wg, kHandoffThreads);
#pragma unroll
        for (int i = 0; i < 8; ++i) drain_chunk(wg, t, j, i, pre_chunk[i]);
        if (j + 1 < tiles) named_barrier_arrive(kDrainedBarrier + wg, kHandoffThreads);
      }
    }
    }
  } else {
    // The tile's accumulators rounded to bf16 (pre, or dpost) at their fragment positions of the staging
    // tile: acc[4jn + 2r + e] is row frag_row + 8r, column 8jn + frag_col + e.
    const int frag_row = (warp & 3) * 16 + (lane >> 2), frag_col = 2 * (lane & 3);
    auto stage_output = [&](const float (&acc)[64]) {
#pragma unroll
      for (int jn = 0; jn < 16; ++jn) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          st_shared_u32(staging_half(warpgroup, jn / 8).pair_address(frag_row + 8 * r, 8 * (jn % 8) + frag_col),
                        pack_bf16(acc[4 * jn + 2 * r], acc[4 * jn + 2 * r + 1]));
      }
    };
    // Frees step s's stage in both CTAs once this warp's MMAs of it are done.
    auto release = [&](int s) {
      if (lane == 0) {
        mbarrier_arrive_cluster(empty(s), 0);
        mbarrier_arrive_cluster(empty(s), 1);
      }
    };
    float acc[64] = {};
    const uint32_t a_offset = warpgroup * 64 * 128;  // this warpgroup's 64 rows of an A slice
    for (int j = 0; j < tiles; ++j) {
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const int s = j * kSteps + k;
        mbarrier_wait(full(s), (s / kStages) & 1);
        const uint32_t a_base = a_slice(s).base + a_offset, b_base = stage(s);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kStepK / 16; ++kk) {
          const uint64_t a_desc = swizzled_tile_descriptor(a_base + kk * 32);
          if constexpr (!kBackward)
            wgmma_m64n128k16_bf16_ss<0, 0>(acc, a_desc, swizzled_tile_descriptor(b_base + kk * 32), k > 0 || kk > 0);
          else
            wgmma_m64n128k16_bf16_ss<0, 1>(acc, a_desc, swizzled_tile_descriptor(b_base + kk * 2048, kHalfTileBytes),
                                           k > 0 || kk > 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (k > 0) release(s - 1);
      }
      wgmma_wait<0>();
      wgmma_fence_operands(acc);
      release(j * kSteps + kSteps - 1);
      if (j > 0) named_barrier_sync(kDrainedBarrier + warpgroup, kHandoffThreads);  // tile j - 1 is out
      stage_output(acc);
      named_barrier_arrive(kStagedBarrier + warpgroup, kHandoffThreads);  // tile j is in for the drain
    }
  }
  cluster_sync();  // no CTA leaves while the other may still release stages into its barriers
#else
  __trap();  // built without sm_90a (PGOLF_CUDA_ARCH): fail loudly rather than compute nothing
#endif
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Runs of hidden tiles per row block for `blocks` row blocks of `tiles` tiles on `sms` multiprocessors
// (one CTA each): the fewest that minimize waves · (tiles a CTA + 2), the 2 standing for a CTA's own
// start (A's load, the pipeline's fill) and end. Measured on an H100 (bench_cuda --only mlp
// --mlp-splits K): at 36,864 rows 2 runs beat 1 at hidden 1536 and 2048 but not at 1024, where the
// cost ties with this constant (1 kept); at 65,536 and 98,304 rows every cut is slower (A is loaded
// once per run). Training-sized batches keep 1 run.
int auto_hidden_splits(int64_t blocks, int tiles, int sms) {
  if (blocks <= 0 || tiles <= 0 || sms <= 0) return 1;
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int splits = 1; splits <= tiles; ++splits) {
    const int per_split = (tiles + splits - 1) / splits;
    if ((tiles + per_split - 1) / per_split != splits) continue;  // the same runs as fewer splits
    const int64_t waves = (blocks * splits + sms - 1) / sms;
    const int64_t cost = waves * (per_split + 2);
    if (cost < best_cost) best = splits, best_cost = cost;
  }
  return best;
}

int multiprocessors() {
  static const int sms = [] {
    int device = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    return device_info(device).sm_count;
  }();
  return sms;
}

// a [rows, 512]; b Wfc [hidden, 512] or Wqkv [hidden, 512] (forward) or Wproj [512, hidden] (backward);
// p holds the epilogue's pointers and scalars, the maps and the grid are set here.
template <Epilogue kEpi, bool kStreamA>
void launch_schedule(const bf16* a, const bf16* b, MlpGemmParams p, const char* what, int hidden_splits,
                     cudaStream_t stream) {
  constexpr bool kBackward = kEpi == Epilogue::mlp_backward;
  const int64_t rows = p.rows;
  const int hidden = p.hidden;
  PG_CUDA_REQUIRE(mlp_fused_supported(kDim, hidden), what);
  PG_CUDA_REQUIRE(aligned16(a) && aligned16(b) && aligned16(p.out) && aligned16(p.pre) && aligned16(p.post),
                  "mlp_fused: every matrix must be 16-byte aligned");
  PG_CUDA_REQUIRE(rows >= 0 && rows < (int64_t{1} << 31), "mlp_fused: rows must be in [0, 2^31)");
  if (rows == 0) return;
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(mlp_fused_gemm_kernel<kEpi, kStreamA>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes<kStreamA>));
    return true;
  }();
  (void)configured;
  p.a_map = swizzled_tensor_map(a, kDim, static_cast<uint64_t>(rows), kBlockM);
  p.b_map = kBackward ? swizzled_tensor_map(b, static_cast<uint64_t>(hidden), kDim, 64)
                      : swizzled_tensor_map(b, kDim, static_cast<uint64_t>(hidden), 64);
  // Whole clusters: a CTA past the last row still streams its half of B for its partner.
  const int64_t blocks = ((rows + kBlockM - 1) / kBlockM + kClusterSize - 1) / kClusterSize * kClusterSize;
  const int tiles = hidden / kBlockN;
  PG_CUDA_REQUIRE(hidden_splits >= 0 && hidden_splits <= tiles,
                  "mlp_fused: hidden_splits must be 0 (chosen) or at most the hidden tiles (hidden / 128)");
  const int splits = hidden_splits > 0 ? hidden_splits : mlp_fused_hidden_splits(rows, hidden, multiprocessors());
  p.tiles_per_split = (tiles + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((tiles + p.tiles_per_split - 1) / p.tiles_per_split));
  mlp_fused_gemm_kernel<kEpi, kStreamA><<<grid, kThreads, kSmemBytes<kStreamA>, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

template <Epilogue kEpi>
void launch(const bf16* a, const bf16* b, const MlpGemmParams& p, const char* what, MlpSchedule schedule,
            int hidden_splits, cudaStream_t stream) {
  if (schedule == MlpSchedule::streamed_operands)
    launch_schedule<kEpi, true>(a, b, p, what, hidden_splits, stream);
  else
    launch_schedule<kEpi, false>(a, b, p, what, hidden_splits, stream);
}

MlpGemmParams mlp_params(const bf16* pre, bf16* out, bf16* post, int64_t rows, int hidden, float slope) {
  MlpGemmParams p{};
  p.pre = pre, p.out = out, p.post = post, p.rows = rows, p.hidden = hidden, p.slope = slope;
  return p;
}

}  // namespace

int mlp_fused_hidden_splits(int64_t rows, int hidden, int multiprocessors) {
  const int64_t blocks = ((rows + kBlockM - 1) / kBlockM + kClusterSize - 1) / kClusterSize * kClusterSize;
  return auto_hidden_splits(blocks, hidden / kBlockN, multiprocessors);
}

bool mlp_fused_supported(int dim, int hidden) {
  static const bool hopper = [] {
    if (device_count() == 0) return false;
    int device = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    const DeviceInfo info = device_info(device);
    return info.cc_major == 9 && info.cc_minor == 0;
  }();
  return hopper && dim == kDim && hidden > 0 && hidden % kBlockN == 0;
}

void mlp_fused_forward(const bf16* m, const bf16* wfc, bf16* pre, bf16* post, int64_t rows, int dim, int hidden,
                       float slope, cudaStream_t stream, MlpSchedule schedule, int hidden_splits) {
  PG_CUDA_REQUIRE(post != nullptr, "mlp_fused_forward: post is required");
  PG_CUDA_REQUIRE(dim == kDim, "mlp_fused_forward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU");
  launch<Epilogue::mlp_forward>(m, wfc, mlp_params(nullptr, pre, post, rows, hidden, slope),
                                "mlp_fused_forward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU", schedule,
                                hidden_splits, stream);
}

void mlp_fused_backward(const bf16* df, const bf16* wproj, const bf16* pre, bf16* dpre, int64_t rows, int dim,
                        int hidden, float slope, cudaStream_t stream, MlpSchedule schedule, int hidden_splits) {
  PG_CUDA_REQUIRE(pre != nullptr && dpre != nullptr, "mlp_fused_backward: pre and dpre are required");
  PG_CUDA_REQUIRE(dim == kDim, "mlp_fused_backward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU");
  launch<Epilogue::mlp_backward>(df, wproj, mlp_params(pre, dpre, nullptr, rows, hidden, slope),
                                 "mlp_fused_backward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU", schedule,
                                 hidden_splits, stream);
}

bool qkv_fused_supported(int dim, const QkShape& s) {
  const int qkv_cols = (s.heads + 2 * s.kv_heads) * 64;
  return mlp_fused_supported(dim, qkv_cols) && s.head_dim == 64 && s.heads > 0 && s.heads % 2 == 0 &&
         s.kv_heads > 0 && s.kv_heads % 2 == 0 &&
         (s.rope_dims == 0 || s.rope_dims == 16 || s.rope_dims == 32 || s.rope_dims == 64) &&
         s.seq_len > 0;
}

void qkv_fused_forward(const bf16* n, const bf16* wqkv, bf16* qkv, bool write_qk_lin, const float* gain,
                       const float* rope_cos, const float* rope_sin, bf16* q, bf16* k, float* q_rstd, float* k_rstd,
                       const QkShape& s, int dim, cudaStream_t stream, MlpSchedule schedule, int hidden_splits) {
  static constexpr const char* kWhat =
      "qkv_fused_forward: needs dim 512, head_dim 64, even heads and kv_heads, rope_dims 0, 16, 32 or 64 and an "
      "sm_90 GPU";
  PG_CUDA_REQUIRE(qkv_fused_supported(dim, s), kWhat);
  PG_CUDA_REQUIRE(qkv && q && k && q_rstd && k_rstd && gain, "qkv_fused_forward: qkv, q, k, the rstds and the gain are required");
  PG_CUDA_REQUIRE(s.rope_dims == 0 || (rope_cos && rope_sin), "qkv_fused_forward: RoPE needs its cos and sin tables");
  PG_CUDA_REQUIRE(aligned16(q) && aligned16(k), "qkv_fused_forward: q and k must be 16-byte aligned");
  MlpGemmParams p{};
  p.out = qkv, p.rows = s.tokens, p.hidden = (s.heads + 2 * s.kv_heads) * 64;
  QkvEpilogue& e = p.qkv;
  e.q = q, e.k = k, e.q_rstd = q_rstd, e.k_rstd = k_rstd, e.gain = gain, e.rope_cos = rope_cos, e.rope_sin = rope_sin;
  e.q_cols = s.heads * 64, e.k_cols = s.kv_heads * 64, e.heads = s.heads, e.kv_heads = s.kv_heads;
  e.seq_len = static_cast<int>(s.seq_len), e.half = s.rope_dims / 2, e.write_qk_lin = write_qk_lin;
  PG_CUDA_REQUIRE(s.seq_len < (int64_t{1} << 31), kWhat);
  launch<Epilogue::qkv_forward>(n, wqkv, p, kWhat, schedule, hidden_splits, stream);
}

}  // namespace pgolf::cuda
