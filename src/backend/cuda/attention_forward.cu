// Flash attention forward (FlashAttention-2 scheme on mma.sync): one block per (query tile, head);
// each warp owns 16 query rows, keeps its Q fragments and its O accumulator in registers and walks
// the key/value tiles of its segment up to the causal diagonal, double-buffered with cp.async,
// with an online softmax in fp32 (base-2 exponent, scale folded in).
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/mma.cuh"

namespace pgolf::cuda {
namespace {

using namespace attention_detail;

constexpr int kForwardBlockN = 64;  // keys per tile

template <int kWarps>
constexpr int forward_smem_bytes() {
  return (16 * kWarps + 4 * kForwardBlockN) * 128;  // Q tile, then K and V tiles, two buffers each
}

// At least two blocks per multiprocessor (for 8 warps: at most 128 registers a thread).
template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 2) attention_forward_kernel(const AttentionForwardParams p) {
  constexpr int kThreads = kWarps * 32, kBlockM = 16 * kWarps, kBlockN = kForwardBlockN;
  constexpr float kScaleLog2 = kSoftmaxScale * kLog2e;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int head = blockIdx.y, kv_head = head / p.group;

  const SegmentTile seg = find_segment_tile(p.cu, p.num_segments, blockIdx.x, kBlockM);
  if (!seg.valid) return;
  // Within a segment the last query tiles have the most keys: schedule them first.
  const int num_q_tiles = (seg.length + kBlockM - 1) / kBlockM;
  const int q_start = (num_q_tiles - 1 - seg.tile) * kBlockM;  // segment-local
  const int q_rows = min(kBlockM, seg.length - q_start);
  if (query_tile_skipped(p, seg, q_start + q_rows)) return;
  const int kv_len = min(seg.length, q_start + kBlockM);  // keys any query of the tile sees
  const int num_kv_tiles = (kv_len + kBlockN - 1) / kBlockN;

  const uint32_t smem_base = smem_address(smem);
  const SwizzledTile64 q_tile{smem_base};
  const uint32_t kv_base = smem_base + kBlockM * 128;
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

  q_tile.load_async<kBlockM, kThreads>(
      p.q + static_cast<int64_t>(seg.start + q_start) * p.q_row_stride + head * kHeadDim, p.q_row_stride, q_rows,
      tid);
  load_kv(0, 0);
  cp_async_commit();

  // Per thread: rows g = lane / 4 and g + 8 of the warp's 16; C-fragment columns 2t, 2t + 1.
  const int warp_row0 = q_start + warp * 16;  // segment-local first query of this warp
  uint32_t q_frag[4][4];
  float o_acc[8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scale·log2(e)·s
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the running sum of exp2

  for (int j = 0; j < num_kv_tiles; ++j) {
    if (j + 1 < num_kv_tiles) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile j (and Q) have landed
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) ldmatrix_x4(q_frag[kk], a_fragment_address(q_tile, warp * 16, kk * 16, lane));
    }
    const int key0 = j * kBlockN;
    // Warps are 16-row aligned and tiles 64-key aligned: a warp that sees key0 sees it in every row.
    if (key0 <= warp_row0 + 15) {
      // S = Q Kᵀ for the warp's 16 rows x 64 keys.
      float s[8][4] = {};
      const SwizzledTile64 kt = k_tile(j & 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, b_pair_address(kt, np * 16, kk * 16, lane));
          mma_bf16(s[2 * np], q_frag[kk], b[0], b[1]);
          mma_bf16(s[2 * np + 1], q_frag[kk], b[2], b[3]);
        }
      }
      if (key0 + kBlockN - 1 > warp_row0) {  // the tile crosses this warp's diagonal
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + nt * 8 + 2 * (lane & 3) + (e & 1);
            const int row = warp_row0 + (lane >> 2) + (e >> 1) * 8;
            if (key > row) s[nt][e] = -INFINITY;
          }
        }
      }
      // Online softmax: new max, rescale the running sum and O, exponentiate in place.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]) * kScaleLog2);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = mx == -INFINITY ? 0.f : mx;  // a row with no visible key yet stays empty
        const float correction = exp2_approx(row_max[r] - base);
        row_max[r] = mx;
        row_sum[r] *= correction;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          o_acc[nt][2 * r] *= correction;
          o_acc[nt][2 * r + 1] *= correction;
          const float p0 = exp2_approx(fmaf(s[nt][2 * r], kScaleLog2, -base));
          const float p1 = exp2_approx(fmaf(s[nt][2 * r + 1], kScaleLog2, -base));
          s[nt][2 * r] = p0;
          s[nt][2 * r + 1] = p1;
          row_sum[r] += p0 + p1;
        }
      }
      // O += P V, P (bf16) straight from the S accumulators.
      const SwizzledTile64 vt = v_tile(j & 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < 4; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, b_pair_trans_address(vt, kk * 16, dp * 16, lane));
          mma_bf16(o_acc[2 * dp], pa, b[0], b[1]);
          mma_bf16(o_acc[2 * dp + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with buffer j & 1 before tile j + 2 is loaded into it
  }

  // O / l and LSE = ln(sum exp(scale·s)) = (max + log2(sum)) · ln 2.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = warp_row0 + (lane >> 2) + r * 8;
    if (row >= seg.length) continue;
    const float inv = 1.f / sum;
    const int64_t token = seg.start + row;
    __nv_bfloat16* dst = p.o + token * p.q_row_stride + head * kHeadDim + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      *reinterpret_cast<uint32_t*>(dst + nt * 8) = pack_bf16(o_acc[nt][2 * r] * inv, o_acc[nt][2 * r + 1] * inv);
    if ((lane & 3) == 0)
      p.lse[static_cast<int64_t>(head) * p.total_tokens + token] = (row_max[r] + log2f(sum)) / kLog2e;
  }
}

template <int kWarps>
void launch_forward(const AttentionForwardParams& p, const AttentionShape& shape, cudaStream_t stream) {
  constexpr int bytes = forward_smem_bytes<kWarps>();
  static const bool configured = [] {
    PG_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<kWarps>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  dim3 grid(segment_tile_grid(shape, 16 * kWarps), shape.num_heads);
  attention_forward_kernel<kWarps><<<grid, kWarps * 32, bytes, stream>>>(p);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

namespace {
// Multiprocessors of the GPU, read once (a machine has one kind of GPU).
int multiprocessors() {
  static const int count = [] {
    int device = 0, n = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    PG_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return count;
}
}  // namespace

void attention_forward(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, __nv_bfloat16* o, float* lse, cudaStream_t stream,
                       const AttentionTuning& tuning) {
  check_attention_shape(shape);
  if (shape.total_tokens == 0) return;
  check_aligned16(q, "attention_forward: q must be a 16-byte aligned device pointer");
  check_aligned16(k, "attention_forward: k must be a 16-byte aligned device pointer");
  check_aligned16(v, "attention_forward: v must be a 16-byte aligned device pointer");
  check_aligned16(o, "attention_forward: o must be a 16-byte aligned device pointer");
  PG_CUDA_REQUIRE(lse != nullptr, "attention_forward: lse must be given");
  const AttentionForwardParams p{attention_layout(shape), q, k, v, o, lse, shape.query_begin};
  if (tuning.forward_kernel == AttentionForwardKernel::wgmma) {
    launch_attention_forward_wgmma(p, shape, tuning.forward_warps, tuning.forward_key_tile, stream);
    return;
  }
  if (tuning.forward_kernel == AttentionForwardKernel::wgmma_ws) {
    check_attention_forward_ws_tuning(tuning.forward_warps, tuning.forward_key_tile);
    if (tuning.forward_ws_min_waves > 0 &&
        static_cast<double>(attention_forward_ws_blocks(shape)) < tuning.forward_ws_min_waves * multiprocessors()) {
      launch_attention_forward_wgmma(p, shape, 8, 64, stream);  // too few blocks for a full GPU
      return;
    }
    launch_attention_forward_ws(p, shape, tuning.forward_warps, tuning.forward_key_tile, stream);
    return;
  }
  switch (tuning.forward_warps) {
    case 4: launch_forward<4>(p, shape, stream); break;
    case 8: launch_forward<8>(p, shape, stream); break;
    default: PG_CUDA_REQUIRE(false, "attention_forward: tuning.forward_warps must be 4 or 8");
  }
}

}  // namespace pgolf::cuda
