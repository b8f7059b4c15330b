// Rows of V ≤ kMaxRowVocab logits keep th = tanh(z/cap) in shared memory between the loss and the
// gradient: one tanh per logit, an online (max, sum of exp) pair per thread (one exponential per logit
// and one per 8), and, when the backward's weights are known, dz written from the stored th with one
// more exponential (the fused forward + backward reads z once). Rows up to 2,048 logits take a warp
// each (8 rows a block, no barrier); longer ones a block of 8 warps (one barrier a row). Each thread
// reads back only the th it stored. Longer rows: one warp per row (registers only), and a backward pass
// that reads z again.
#include <algorithm>
#include <cmath>

#include "backend/cuda/check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/softcap_ce.h"

namespace pgolf::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxWarpRowVocab = 2048;  // rows a warp takes (8 KB of th a warp)
constexpr int kMaxRowVocab = 32768;     // rows with th in shared memory (128 KB a block)

constexpr float kLog2e = 1.4426950408889634f;

// e^x as 2^(x·log2 e) on the multi-function unit (ex2.approx, relative error about 2^-22; flushes results
// below 2^-126 to 0): one multiply-add and one MUFU instead of the accurate expf's range reduction. The
// soft-capped exponents are in [−2·cap, 0].
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The per-row constants of d loss / d z: a = cap·log2 e, b = lse·log2 e, the row's weight w.
struct CeGradRow {
  float a, b, w;
};
__device__ __forceinline__ CeGradRow ce_grad_row(float cap, float l, float w) { return {cap * kLog2e, l * kLog2e, w}; }

// d loss / d z of one logit, from th = tanh(z/cap): w·(exp(cap·th − lse) − [target])·(1 − th²). Both
// backward layouts call it, so the fused pass writes the separate pass's bits for the same lse.
__device__ __forceinline__ float ce_grad(float th, const CeGradRow& r, bool target) {
  float g = exp2_approx(__fmaf_rn(th, r.a, -r.b));
  if (target) g -= 1.f;
  return __fmul_rn(__fmul_rn(r.w, g), __fmaf_rn(-th, th, 1.f));
}

// Merges (m, s) pairs (running max, sum of exp(c − m)) across the 32 lanes: the warp's max first, then
// each sum rescaled to it (one exponential a lane) and summed. The xor butterfly gives every lane the same
// pair (each addition has the same two operands on both lanes).
__device__ __forceinline__ void merge_warp(float& m, float& s) {
  float m_warp = m;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m_warp = fmaxf(m_warp, __shfl_xor_sync(0xffffffffu, m_warp, offset));
  s = m == -INFINITY ? 0.f : s * exp2_approx(__fmul_rn(m - m_warp, kLog2e));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  m = m_warp;
}

// The online (max, sum of exp) pair of one thread after 8 more capped logits c.
__device__ __forceinline__ void online_add(float& m, float& s, const float (&c)[8]) {
  float vmax = c[0];
#pragma unroll
  for (int e = 1; e < 8; ++e) vmax = fmaxf(vmax, c[e]);
  const float m_new = fmaxf(m, vmax), shift = -m_new * kLog2e;
  s *= exp2_approx(__fmaf_rn(m, kLog2e, shift));  // m = −inf the first time: 2^−inf = 0
#pragma unroll
  for (int e = 0; e < 8; ++e) s += exp2_approx(__fmaf_rn(c[e], kLog2e, shift));
  m = m_new;
}

// kBlockRow: one row per block of kWarps warps; else one row per warp. th of vector j of a row sits in
// the row's shared floats as two float4 halves at [j] and [vecs + j] (float4 units: a warp's accesses
// are contiguous). dz (may alias z; each thread writes only vectors it read): written when not null,
// with weights[row] or uniform_weight.
template <bool kBlockRow>
__global__ void __launch_bounds__(kWarps * 32)
    softcap_ce_rows_kernel(const bf16* z, const int32_t* __restrict__ targets, float* __restrict__ losses,
                           float* __restrict__ lse, int64_t N, int V, float cap, bf16* dz,
                           const float* __restrict__ weights, float uniform_weight) {
  pdl_prologue();
  extern __shared__ float4 th_rows[];
  __shared__ float part_m[2][kWarps], part_s[2][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = kBlockRow ? static_cast<int>(threadIdx.x) : lane;
  constexpr int kStride = kBlockRow ? kWarps * 32 : 32;
  const int64_t first = kBlockRow ? blockIdx.x : static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t step = kBlockRow ? gridDim.x : static_cast<int64_t>(gridDim.x) * kWarps;
  const int vecs = V / 8;
  float4* th_row = th_rows + (kBlockRow ? 0 : warp * 2 * vecs);
  const float inv_cap = 1.f / cap;
  int parity = 0;
  for (int64_t row = first; row < N; row += step, parity ^= 1) {
    const bf16* zr = z + row * V;
    const int target = targets[row];
    // Read before the barrier (performed relative to the block's threads at it), so before any dz of
    // the row is written.
    const float z_target = slot == 0 ? __bfloat162float(zr[target]) : 0.f;
    float m = -INFINITY, s = 0.f;
    for (int j = slot; j < vecs; j += kStride) {
      float t[8], c[8];
      load8(zr + j * 8, t);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        t[e] = tanhf(t[e] * inv_cap);
        c[e] = __fmul_rn(cap, t[e]);
      }
      th_row[j] = make_float4(t[0], t[1], t[2], t[3]);
      th_row[vecs + j] = make_float4(t[4], t[5], t[6], t[7]);
      online_add(m, s, c);
    }
    merge_warp(m, s);
    if constexpr (kBlockRow) {
      // Every warp merges the warps' pairs itself, in the same order: one barrier a row (the slots of a
      // parity are rewritten two rows later, after every warp has passed the next row's barrier).
      if (lane == 0) part_m[parity][warp] = m, part_s[parity][warp] = s;
      __syncthreads();
      m = lane < kWarps ? part_m[parity][lane] : -INFINITY;
      s = lane < kWarps ? part_s[parity][lane] : 0.f;
      merge_warp(m, s);
    }
    const float l = m + logf(s);
    if (slot == 0) {
      lse[row] = l;
      losses[row] = l - __fmul_rn(cap, tanhf(z_target * inv_cap));
    }
    if (!dz) continue;
    const CeGradRow r = ce_grad_row(cap, l, weights ? weights[row] : uniform_weight);
    for (int j = slot; j < vecs; j += kStride) {
      const float4 a = th_row[j], b = th_row[vecs + j];
      const float t[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = ce_grad(t[e], r, j * 8 + e == target);
      store8(dz + row * V + j * 8, o);
    }
  }
}

__global__ void __launch_bounds__(kWarps * 32) softcap_ce_forward_kernel(const bf16* __restrict__ z,
                                                                         const int32_t* __restrict__ targets,
                                                                         float* __restrict__ losses,
                                                                         float* __restrict__ lse, int64_t N, int V,
                                                                         float cap) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const float inv_cap = 1.f / cap;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < N;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const bf16* zr = z + row * V;
    float m = -INFINITY, s = 0.f;
    for (int f0 = lane * 8; f0 < V; f0 += 256) {
      float v[8];
      load8(zr + f0, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(cap, tanhf(v[e] * inv_cap));
      online_add(m, s, v);
    }
    merge_warp(m, s);
    if (lane == 0) {
      const float l = m + logf(s);
      lse[row] = l;
      const float ct = cap * tanhf(__bfloat162float(zr[targets[row]]) * inv_cap);
      losses[row] = l - ct;
    }
  }
}

__global__ void __launch_bounds__(kWarps * 32) softcap_ce_backward_kernel(
    const bf16* z, const float* __restrict__ lse, const int32_t* __restrict__ targets,
    const float* __restrict__ weights, float uniform_weight, bf16* dz, int64_t N, int V, float cap) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const float inv_cap = 1.f / cap;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < N;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const CeGradRow r = ce_grad_row(cap, lse[row], weights ? weights[row] : uniform_weight);
    const int t = targets[row];
    for (int f0 = lane * 8; f0 < V; f0 += 256) {
      float v[8];
      load8(z + row * V + f0, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = ce_grad(tanhf(v[e] * inv_cap), r, f0 + e == t);
      store8(dz + row * V + f0, v);
    }
  }
}

__global__ void mean_loss_kernel(const float* __restrict__ losses, int64_t n, float* __restrict__ out) {
  pdl_prologue();
  __shared__ float smem[32];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
  store_scalar_partial(s, smem, out);
  if (threadIdx.x == 0) *out /= static_cast<float>(n);
}

__global__ void scatter_losses_kernel(const float* __restrict__ values, const int32_t* __restrict__ index, int64_t rows,
                                      float* __restrict__ out) {
  pdl_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[index[i]] = values[i];
}

int row_grid(int64_t N) { return item_blocks(N, kWarps, 4 * 132 * 8); }

template <bool kBlockRow>
void launch_rows(const bf16* z, const int32_t* targets, float* losses, float* lse, int64_t N, int V, float cap,
                 const CeGradient* grad, cudaStream_t stream) {
  const size_t smem = size_t(V) * sizeof(float) * (kBlockRow ? 1 : kWarps);
  static const int sms = [] {  // once per kernel (thread-safe): shared memory past 48 KB allowed
    const size_t most = size_t(kBlockRow ? kMaxRowVocab : kMaxWarpRowVocab) * sizeof(float) * (kBlockRow ? 1 : kWarps);
    PG_CUDA_CHECK(cudaFuncSetAttribute(softcap_ce_rows_kernel<kBlockRow>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(most)));
    int device = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    return device_info(device).sm_count;
  }();
  int per_sm = 0;
  PG_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, softcap_ce_rows_kernel<kBlockRow>, kWarps * 32,
                                                              smem));
  PG_CUDA_REQUIRE(per_sm > 0, "softcap_ce: the row kernel does not fit a multiprocessor");
  const int64_t rows_per_block = kBlockRow ? 1 : kWarps;
  const int blocks = static_cast<int>(std::min<int64_t>((N + rows_per_block - 1) / rows_per_block, int64_t{per_sm} * sms));
  launch_kernel(softcap_ce_rows_kernel<kBlockRow>, blocks, kWarps * 32, smem, stream, z, targets, losses, lse, N, V,
                cap, grad ? grad->dz : nullptr, grad ? grad->weights : nullptr, grad ? grad->uniform_weight : 0.f);
}

}  // namespace

void softcap_ce_forward(const bf16* z, const int32_t* targets, float* losses, float* lse, int64_t N, int V, float cap,
                        cudaStream_t stream, const CeGradient* grad) {
  PG_CUDA_REQUIRE(V > 0 && V % 8 == 0, "softcap_ce_forward: the vocab must be a positive multiple of 8");
  PG_CUDA_REQUIRE(cap > 0.f, "softcap_ce_forward: the soft cap must be positive");
  PG_CUDA_REQUIRE(!grad || grad->dz, "softcap_ce_forward: a gradient request needs dz");
  if (N == 0) return;
  if (V > kMaxRowVocab) {  // one warp per row, then the separate backward
    launch_kernel(softcap_ce_forward_kernel, row_grid(N), kWarps * 32, 0, stream, z, targets, losses, lse, N, V, cap);
    PG_CUDA_LAUNCH_CHECK();
    if (grad) softcap_ce_backward(z, lse, targets, grad->weights, grad->uniform_weight, grad->dz, N, V, cap, stream);
    return;
  }
  if (V <= kMaxWarpRowVocab) launch_rows<false>(z, targets, losses, lse, N, V, cap, grad, stream);
  else launch_rows<true>(z, targets, losses, lse, N, V, cap, grad, stream);
  PG_CUDA_LAUNCH_CHECK();
}

void softcap_ce_backward(const bf16* z, const float* lse, const int32_t* targets, const float* weights,
                         float uniform_weight, bf16* dz, int64_t N, int V, float cap, cudaStream_t stream) {
  PG_CUDA_REQUIRE(V > 0 && V % 8 == 0, "softcap_ce_backward: the vocab must be a positive multiple of 8");
  if (N == 0) return;
  launch_kernel(softcap_ce_backward_kernel, row_grid(N), kWarps * 32, 0, stream, z, lse, targets, weights,
                uniform_weight, dz, N, V, cap);
  PG_CUDA_LAUNCH_CHECK();
}

void mean_loss(const float* losses, int64_t n, float* out, cudaStream_t stream) {
  PG_CUDA_REQUIRE(n > 0, "mean_loss: no losses");
  launch_kernel(mean_loss_kernel, 1, 1024, 0, stream, losses, n, out);
  PG_CUDA_LAUNCH_CHECK();
}

void scatter_losses(const float* values, const int32_t* index, int64_t rows, float* out, int64_t n,
                    cudaStream_t stream) {
  PG_CUDA_REQUIRE(rows >= 0 && rows <= n, "scatter_losses: more selected rows than positions");
  PG_CUDA_CHECK(cudaMemsetAsync(out, 0xFF, static_cast<size_t>(n) * sizeof(float), stream));  // all bits set: NaN
  if (rows == 0) return;
  const int threads = 256;
  launch_kernel(scatter_losses_kernel, item_blocks(rows, threads), threads, 0, stream, values, index, rows, out);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
