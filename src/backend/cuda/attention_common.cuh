// Pieces shared by the attention kernels: constants, parameter checks, and the mapping of a flat
// block index to (segment, tile) for variable-length segments.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/attention.h"
#include "backend/cuda/check.h"

namespace pgolf::cuda::attention_detail {

constexpr int kHeadDim = kAttentionHeadDim;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kSoftmaxScale = 0.125f;  // 1 / sqrt(64)

// Flat tiling of variable-length segments without a prefix sum: segment s owns the block indices
// [base(s), base(s + 1)) with base(s) = s + cu[s] / tile. base(s + 1) - base(s) is at least
// ceil(length / tile), so every tile of every segment has an index; the few spare indices (at most
// one per segment) belong to no tile and their blocks exit at once. The grid has base(num_segments)
// = num_segments + N / tile blocks along x.
struct SegmentTile {
  int start;   // first token of the segment
  int length;  // tokens in the segment
  int tile;    // tile index within the segment
  bool valid;  // tile * tile_size < length
  int segment;  // the segment's index
};

__device__ __forceinline__ SegmentTile find_segment_tile(const int32_t* __restrict__ cu, int num_segments,
                                                         int block, int tile_size) {
  int lo = 0, hi = num_segments - 1;  // the last segment whose base is <= block
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (mid + __ldg(cu + mid) / tile_size <= block) lo = mid;
    else hi = mid - 1;
  }
  SegmentTile t;
  t.start = __ldg(cu + lo);
  t.length = __ldg(cu + lo + 1) - t.start;
  t.tile = block - (lo + t.start / tile_size);
  t.valid = t.tile * tile_size < t.length;
  t.segment = lo;
  return t;
}

// 2^x as one MUFU.EX2 (ex2.approx.ftz, about 2 ulp). exp2f compiles to the same instruction plus
// denormal handling, which cost about 10% of the attention kernels' time on an H100. Flushing
// results below 2^-126 to zero is harmless here: every softmax row has a term equal to 1.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

inline int segment_tile_grid(const AttentionShape& s, int tile_size) {
  return s.num_segments + s.total_tokens / tile_size;
}

// The backward's key-tile work list (AttentionBackwardParams::tile_schedule): at most
// kMaxScheduleTiles key tiles per segment, and never more entries than tokens + tokens / 64 (every
// tile but one per segment is full, with at least 64 keys) plus the count.
constexpr int kMaxScheduleTiles = 2048;
inline size_t tile_schedule_entries(const AttentionShape& s) {
  return static_cast<size_t>(s.total_tokens) + s.total_tokens / 64 + 1;
}

// Host-side checks shared by forward and backward (sizes, head grouping, pointer alignment).
inline void check_attention_shape(const AttentionShape& s) {
  PG_CUDA_REQUIRE(s.total_tokens >= 0, "attention: total_tokens must be non-negative");
  PG_CUDA_REQUIRE(s.num_heads > 0 && s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0,
                  "attention: num_kv_heads must be positive and divide num_heads");
  PG_CUDA_REQUIRE(s.num_segments >= 1 && s.cu_seqlens != nullptr,
                  "attention: cu_seqlens must be given with at least one segment");
}

inline void check_aligned16(const void* p, const char* what) {
  PG_CUDA_REQUIRE(p != nullptr && (reinterpret_cast<uintptr_t>(p) & 15) == 0, what);
}

// What a forward kernel reads and writes (attention_forward.cu fills it for either implementation).
// The token layout every attention kernel reads (the base of their parameter blocks): the segments
// (cu_seqlens), the GQA group and the row strides of q and k/v.
struct AttentionLayout {
  const int32_t* __restrict__ cu;
  int num_segments, total_tokens, group;  // group = H / Hkv
  int64_t q_row_stride, kv_row_stride;    // H * 64, Hkv * 64
};

inline AttentionLayout attention_layout(const AttentionShape& shape) {
  return {shape.cu_seqlens,
          shape.num_segments,
          shape.total_tokens,
          shape.num_heads / shape.num_kv_heads,
          static_cast<int64_t>(shape.num_heads) * kHeadDim,
          static_cast<int64_t>(shape.num_kv_heads) * kHeadDim};
}

struct AttentionForwardParams : AttentionLayout {
  const __nv_bfloat16* __restrict__ q;
  const __nv_bfloat16* __restrict__ k;
  const __nv_bfloat16* __restrict__ v;
  __nv_bfloat16* __restrict__ o;
  float* __restrict__ lse;
  const int32_t* __restrict__ query_begin;  // AttentionShape::query_begin (null: every query)
};

// Whether a forward block's query rows [q_start, q_end) (segment-local) all lie before the first
// query the caller needs (AttentionShape::query_begin): the block has nothing to write.
__device__ __forceinline__ bool query_tile_skipped(const AttentionForwardParams& p, const SegmentTile& seg, int q_end) {
  return p.query_begin != nullptr && q_end <= __ldg(p.query_begin + seg.segment);
}

// What a backward main kernel reads and writes (attention_backward.cu fills it for either
// implementation); delta = rowsum(dO ∘ O) and the fp32 dq accumulator come from the workspace.
struct AttentionBackwardParams : AttentionLayout {
  const __nv_bfloat16* __restrict__ q;
  const __nv_bfloat16* __restrict__ k;
  const __nv_bfloat16* __restrict__ v;
  const __nv_bfloat16* __restrict__ d_o;
  const float* __restrict__ lse;    // [H, N]
  const float* __restrict__ delta;  // [H, N]
  float* __restrict__ dq_accum;     // [N, H, 64]
  // The wgmma kernel's work list, written by the prepare kernel (attention_backward.cu): entry 0 is
  // {count, 0}, then `count` (segment, key tile) pairs, longest work first; count -1: no list.
  const int2* __restrict__ tile_schedule;
  __nv_bfloat16* __restrict__ dk;
  __nv_bfloat16* __restrict__ dv;
};

// The wgmma kernels run only on an sm_90 GPU (wgmma is Hopper's; sm_90a code does not run on later
// architectures either); `what` names the caller in the error.
inline void require_hopper(const char* what) {
  static const bool is_hopper = [] {
    int device = 0, major = 0, minor = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    PG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    PG_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return major == 9 && minor == 0;
  }();
  PG_CUDA_REQUIRE(is_hopper, what);
}

// The Hopper forward (attention_forward_wgmma.cu): `warps` 4 or 8 (one or two warpgroups of 64 query
// rows), `key_tile` 64 or 128 keys per K/V tile.
void launch_attention_forward_wgmma(const AttentionForwardParams& p, const AttentionShape& shape, int warps,
                                    int key_tile, cudaStream_t stream);

// The warp-specialized Hopper forward (attention_forward_ws.cu): `warps` 12 consumer warps (three
// warpgroups of 64 query rows, plus a producer warpgroup), `key_tile` 64 or 128.
void launch_attention_forward_ws(const AttentionForwardParams& p, const AttentionShape& shape, int warps,
                                 int key_tile, cudaStream_t stream);
// Refuses a tuning the warp-specialized forward does not take (also where a small shape would fall back).
void check_attention_forward_ws_tuning(int warps, int key_tile);
// The blocks launch_attention_forward_ws runs for `shape` (an upper bound over the segments' tiles).
int64_t attention_forward_ws_blocks(const AttentionShape& shape);

// The Hopper backward main kernel (attention_backward_wgmma.cu): `warps` 4, 8 or 12 (one, two or
// three warpgroups of 64 keys), 8 · dq (the softmax scale 1/8 is left to the finish kernel) added to
// p.dq_accum with fp32 atomics, dk and dv written.
void launch_attention_backward_wgmma(const AttentionBackwardParams& p, const AttentionShape& shape, int warps,
                                     cudaStream_t stream);
// The key-tile size p.tile_schedule is built for with `warps`: the kernel's keys per block (64 per
// warpgroup) when it takes its tiles longest first (12 warps), 0 when it walks the flat segment
// tiling (4 and 8 warps, for which that order measured faster; attention_backward.cu).
int attention_backward_wgmma_schedule_keys(int warps);

// The warp-specialized Hopper backward main kernel (attention_backward_ws.cu): `warps` 12 (three
// consumer warpgroups of 64 keys and a producer warpgroup), the same outputs as
// launch_attention_backward_wgmma with 12 warps.
void launch_attention_backward_ws(const AttentionBackwardParams& p, const AttentionShape& shape, int warps,
                                  cudaStream_t stream);
// The key-tile size of its work list for the prepare kernel: 0, none (it runs its blocks in the flat
// segment-major order, for L2 locality); refuses other `warps`.
int attention_backward_ws_schedule_keys(int warps);

// The deterministic dQ pass (attention_dq.cu): dq written (bf16) from q, k, v, dO, the forward's LSE
// and D = rowsum(dO ∘ O) [H, N].
void launch_attention_dq(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, const __nv_bfloat16* d_o, const float* lse, const float* delta,
                         __nv_bfloat16* dq, cudaStream_t stream);

}  // namespace pgolf::cuda::attention_detail
