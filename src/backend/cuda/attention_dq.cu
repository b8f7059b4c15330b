// Deterministic dQ of flash attention (AttentionTuning::deterministic): instead of the main backward
// kernel's fp32 atomics, one block per (query tile, head) walks the key tiles of its segment up to the
// causal diagonal, as the forward kernel does, and sums dQ in registers in key order:
//   S = Q Kᵀ, P = exp(scale·S − LSE), dP = dO Vᵀ, dS = scale · P ∘ (dP − D), dQ += dS K
// (dS rounded to bf16 before the product, as in the main kernel). The same inputs give the same bits
// on every run; the price is recomputing S and dP (two of the backward's five products).
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"

namespace pgolf::cuda {
namespace attention_detail {
namespace {

constexpr int kDqBlockN = 64;  // keys per tile

struct DqParams : AttentionLayout {
  const __nv_bfloat16* __restrict__ q;
  const __nv_bfloat16* __restrict__ k;
  const __nv_bfloat16* __restrict__ v;
  const __nv_bfloat16* __restrict__ d_o;
  const float* __restrict__ lse;    // [H, N]
  const float* __restrict__ delta;  // [H, N]
  __nv_bfloat16* __restrict__ dq;
};

template <int kWarps>
constexpr int dq_smem_bytes() {
  return (2 * 16 * kWarps + 4 * kDqBlockN) * 128;  // Q and dO tiles, then K and V tiles, two buffers each
}

template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 2) attention_dq_kernel(const DqParams p) {
  constexpr int kThreads = kWarps * 32, kBlockM = 16 * kWarps, kBlockN = kDqBlockN;
  constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int head = blockIdx.y, kv_head = head / p.group;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockM);
  if (!seg.valid) return;
  // The last query tiles have the most keys: schedule them first.
  const int num_q_tiles = (seg.length + kBlockM - 1) / kBlockM;
  const int q_start = (num_q_tiles - 1 - seg.tile) * kBlockM;  // segment-local
  const int q_rows = min(kBlockM, seg.length - q_start);
  const int kv_len = min(seg.length, q_start + kBlockM);
  const int num_kv_tiles = (kv_len + kBlockN - 1) / kBlockN;

  const uint32_t smem_base = smem_address(smem);
  const SwizzledTile64 q_tile{smem_base};
  const SwizzledTile64 do_tile{smem_base + kBlockM * 128};
  const uint32_t kv_base = smem_base + 2 * kBlockM * 128;
  auto k_tile = [&](int buf) { return SwizzledTile64{kv_base + static_cast<uint32_t>(buf * 2 * kBlockN * 128)}; };
  auto v_tile = [&](int buf) { return SwizzledTile64{kv_base + static_cast<uint32_t>((buf * 2 + 1) * kBlockN * 128)}; };

  const __nv_bfloat16* k_src = p.k + static_cast<int64_t>(seg.start) * p.kv_row_stride + kv_head * kHeadDim;
  const __nv_bfloat16* v_src = p.v + static_cast<int64_t>(seg.start) * p.kv_row_stride + kv_head * kHeadDim;
  auto load_kv = [&](int tile, int buf) {
    const int64_t offset = static_cast<int64_t>(tile) * kBlockN * p.kv_row_stride;
    const int rows = kv_len - tile * kBlockN;
    k_tile(buf).template load_async<kBlockN, kThreads>(k_src + offset, p.kv_row_stride, rows, tid);
    v_tile(buf).template load_async<kBlockN, kThreads>(v_src + offset, p.kv_row_stride, rows, tid);
  };
  const int64_t q_offset = static_cast<int64_t>(seg.start + q_start) * p.q_row_stride + head * kHeadDim;
  q_tile.load_async<kBlockM, kThreads>(p.q + q_offset, p.q_row_stride, q_rows, tid);
  do_tile.load_async<kBlockM, kThreads>(p.d_o + q_offset, p.q_row_stride, q_rows, tid);
  load_kv(0, 0);
  cp_async_commit();

  // Per thread: rows g = lane / 4 and g + 8 of the warp's 16; C-fragment columns 2t, 2t + 1.
  const int warp_row0 = q_start + warp * 16;  // segment-local first query of this warp
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + (lane >> 2) + r * 8;
    const int64_t at = static_cast<int64_t>(head) * p.total_tokens + seg.start + row;
    row_lse[r] = row < seg.length ? p.lse[at] * kLog2e : 0.f;
    row_delta[r] = row < seg.length ? p.delta[at] : 0.f;
  }
  uint32_t q_frag[4][4], do_frag[4][4];
  float dq_acc[8][4] = {};

  for (int j = 0; j < num_kv_tiles; ++j) {
    if (j + 1 < num_kv_tiles) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile j (and Q, dO) have landed
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        ldmatrix_x4(q_frag[kk], a_fragment_address(q_tile, warp * 16, kk * 16, lane));
        ldmatrix_x4(do_frag[kk], a_fragment_address(do_tile, warp * 16, kk * 16, lane));
      }
    }
    const int key0 = j * kBlockN;
    if (key0 <= warp_row0 + 15) {
      // S = Q Kᵀ and dP = dO Vᵀ for the warp's 16 rows x 64 keys.
      float s[8][4] = {}, dp[8][4] = {};
      const SwizzledTile64 kt = k_tile(j & 1), vt = v_tile(j & 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, b_pair_address(kt, np * 16, kk * 16, lane));
          mma_bf16(s[2 * np], q_frag[kk], b[0], b[1]);
          mma_bf16(s[2 * np + 1], q_frag[kk], b[2], b[3]);
          ldmatrix_x4(b, b_pair_address(vt, np * 16, kk * 16, lane));
          mma_bf16(dp[2 * np], do_frag[kk], b[0], b[1]);
          mma_bf16(dp[2 * np + 1], do_frag[kk], b[2], b[3]);
        }
      }
      // dS = scale · P ∘ (dP − D); keys after a query and queries past the segment give 0.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + nt * 8 + 2 * (lane & 3) + (e & 1);
          const int row = warp_row0 + (lane >> 2) + (e >> 1) * 8;
          const bool visible = key <= row && row < seg.length;
          const float prob = visible ? exp2_approx(fmaf(s[nt][e], kScaleLog2, -row_lse[e >> 1])) : 0.f;
          dp[nt][e] = prob * (dp[nt][e] - row_delta[e >> 1]) * kSoftmaxScale;
        }
      }
      // dQ += dS K (dS as the A operand straight from the accumulators, K read transposed).
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t da[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                                pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int dpair = 0; dpair < 4; ++dpair) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, b_pair_trans_address(kt, kk * 16, dpair * 16, lane));
          mma_bf16(dq_acc[2 * dpair], da, b[0], b[1]);
          mma_bf16(dq_acc[2 * dpair + 1], da, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with buffer j & 1 before tile j + 2 is loaded into it
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + (lane >> 2) + r * 8;
    if (row >= seg.length) continue;
    __nv_bfloat16* dst = p.dq + static_cast<int64_t>(seg.start + row) * p.q_row_stride + head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      *reinterpret_cast<uint32_t*>(dst + nt * 8) = pack_bf16(dq_acc[nt][2 * r], dq_acc[nt][2 * r + 1]);
  }
}

}  // namespace

void launch_attention_dq(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, const __nv_bfloat16* d_o, const float* lse, const float* delta,
                         __nv_bfloat16* dq, cudaStream_t stream) {
  constexpr int kWarps = 4;
  constexpr int bytes = dq_smem_bytes<kWarps>();
  static const bool configured = [] {
    PG_CUDA_CHECK(
        cudaFuncSetAttribute(attention_dq_kernel<kWarps>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  const DqParams p{attention_layout(shape), q, k, v, d_o, lse, delta, dq};
  dim3 grid(segment_tile_grid(shape, 16 * kWarps), shape.num_heads);
  attention_dq_kernel<kWarps><<<grid, kWarps * 32, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace attention_detail
}  // namespace pgolf::cuda
