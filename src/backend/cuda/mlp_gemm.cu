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
// 16-byte chunks (coalesced, 8 per thread and consumer warpgroup) while the consumers compute the
// next tile; a named barrier pair per consumer warpgroup hands the staging tile over (staged) and
// back (drained).
// A chunk of the forward is written as pre and, activated, as post; one of the backward becomes dpre =
// bf16(dpost · f'(pre)) with pre's chunk (prefetched to L2 as the drain of the tile begins) loaded
// before the tile is staged. dpost itself is never written. The drain has warps of its own because
// the consumers' loop is latency-bound: with one chunk per thread drained in each k-step of the next
// tile, as this kernel first did, a warpgroup almost never waited for its previous MMAs but took
// about twice their time per step (the chunk's shared-memory load latency and ALU work in line with
// the MMA issue), and its own drain warps made the forward 11 % and the backward 14 % faster.
#include <cstdint>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/mma.cuh"
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

struct MlpGemmParams {
  CUtensorMap a_map;  // A [rows, 512], boxes of 128 rows x 64
  CUtensorMap b_map;  // Wfc [hidden, 512] or Wproj [512, hidden], boxes of 64 x 64
  const bf16* pre;    // backward: [rows, hidden]
  bf16* out;          // forward: pre; backward: dpre
  bf16* post;         // forward: post
  int64_t rows;
  int hidden;
  int tiles_per_split;  // hidden tiles of a CTA: blockIdx.y's run starts at tile blockIdx.y · tiles_per_split
  float slope;
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

template <bool kBackward, bool kStreamA>
__global__ void __cluster_dims__(kClusterSize, 1, 1) __launch_bounds__(kThreads, 1)
    mlp_fused_gemm_kernel(const __grid_constant__ MlpGemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
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
        if (p.out) *reinterpret_cast<uint4*>(p.out + offset) = v;  // pre: null when no backward follows
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 x = unpack_bf16(in[e]);
          out[e] = pack_bf16(leaky_relu_sq_value(x.x, p.slope), leaky_relu_sq_value(x.y, p.slope));
        }
        *reinterpret_cast<uint4*>(p.post + offset) = result;
      } else {
        const uint32_t* pre = &pre_value.x;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 d = unpack_bf16(in[e]), x = unpack_bf16(pre[e]);
          out[e] = pack_bf16(leaky_relu_sq_gradient(d.x, x.x, slope_sq), leaky_relu_sq_gradient(d.y, x.y, slope_sq));
        }
        *reinterpret_cast<uint4*>(p.out + offset) = result;
      }
    };
    // Tile j of each consumer warpgroup once it is staged, while the consumers compute tile j + 1.
    // The backward's pre chunks of the tile are prefetched to L2 before the waits, and each
    // warpgroup's 8 loaded before its own.
    const int t = tid - kConsumerThreads;
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

// a [rows, 512]; b Wfc [hidden, 512] (forward) or Wproj [512, hidden] (backward).
template <bool kBackward, bool kStreamA>
void launch_schedule(const bf16* a, const bf16* b, const bf16* pre, bf16* out, bf16* post, int64_t rows, int dim, int hidden,
            float slope, const char* what, int hidden_splits, cudaStream_t stream) {
  PG_CUDA_REQUIRE(mlp_fused_supported(dim, hidden), what);
  PG_CUDA_REQUIRE(aligned16(a) && aligned16(b) && aligned16(out) && aligned16(pre) && aligned16(post),
                  "mlp_fused: every matrix must be 16-byte aligned");
  PG_CUDA_REQUIRE(rows >= 0 && rows < (int64_t{1} << 31), "mlp_fused: rows must be in [0, 2^31)");
  if (rows == 0) return;
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(mlp_fused_gemm_kernel<kBackward, kStreamA>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes<kStreamA>));
    return true;
  }();
  (void)configured;
  MlpGemmParams p;
  p.a_map = swizzled_tensor_map(a, kDim, static_cast<uint64_t>(rows), kBlockM);
  p.b_map = kBackward ? swizzled_tensor_map(b, static_cast<uint64_t>(hidden), kDim, 64)
                      : swizzled_tensor_map(b, kDim, static_cast<uint64_t>(hidden), 64);
  p.pre = pre, p.out = out, p.post = post, p.rows = rows, p.hidden = hidden, p.slope = slope;
  // Whole clusters: a CTA past the last row still streams its half of B for its partner.
  const int64_t blocks = ((rows + kBlockM - 1) / kBlockM + kClusterSize - 1) / kClusterSize * kClusterSize;
  const int tiles = hidden / kBlockN;
  PG_CUDA_REQUIRE(hidden_splits >= 0 && hidden_splits <= tiles,
                  "mlp_fused: hidden_splits must be 0 (chosen) or at most the hidden tiles (hidden / 128)");
  const int splits = hidden_splits > 0 ? hidden_splits : mlp_fused_hidden_splits(rows, hidden, multiprocessors());
  p.tiles_per_split = (tiles + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((tiles + p.tiles_per_split - 1) / p.tiles_per_split));
  mlp_fused_gemm_kernel<kBackward, kStreamA><<<grid, kThreads, kSmemBytes<kStreamA>, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

template <bool kBackward>
void launch(const bf16* a, const bf16* b, const bf16* pre, bf16* out, bf16* post, int64_t rows, int dim, int hidden,
            float slope, const char* what, MlpSchedule schedule, int hidden_splits, cudaStream_t stream) {
  if (schedule == MlpSchedule::streamed_operands)
    launch_schedule<kBackward, true>(a, b, pre, out, post, rows, dim, hidden, slope, what, hidden_splits, stream);
  else
    launch_schedule<kBackward, false>(a, b, pre, out, post, rows, dim, hidden, slope, what, hidden_splits, stream);
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
  launch<false>(m, wfc, nullptr, pre, post, rows, dim, hidden, slope,
                "mlp_fused_forward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU", schedule, hidden_splits,
                stream);
}

void mlp_fused_backward(const bf16* df, const bf16* wproj, const bf16* pre, bf16* dpre, int64_t rows, int dim,
                        int hidden, float slope, cudaStream_t stream, MlpSchedule schedule, int hidden_splits) {
  PG_CUDA_REQUIRE(pre != nullptr && dpre != nullptr, "mlp_fused_backward: pre and dpre are required");
  launch<true>(df, wproj, pre, dpre, nullptr, rows, dim, hidden, slope,
               "mlp_fused_backward: needs dim 512, hidden a multiple of 128 and an sm_90 GPU", schedule, hidden_splits,
               stream);
}

}  // namespace pgolf::cuda
