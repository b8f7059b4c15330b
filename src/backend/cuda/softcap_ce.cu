// Two layouts. Rows of V ≤ kMaxRowVocab logits: one block per row, each thread holding K vectors of 8
// (vector j = thread + i·threads, so a warp's loads are 512 contiguous bytes) as tanh(z/cap) in
// registers: one tanh and one exponential per logit for the loss, and, when the backward's weights are
// known, dz written from the same registers (the fused forward + backward reads z once). Longer rows: one
// warp per row with an online (max, sum of exp) pair, and a backward pass that reads z again.
#include <algorithm>
#include <atomic>
#include <cmath>

#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/softcap_ce.h"

namespace pgolf::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxRowThreads = 512;
constexpr int kMaxVecsPerThread = 8;
constexpr int kMaxRowVocab = kMaxRowThreads * kMaxVecsPerThread * 8;  // 32,768

// d loss / d z of one logit, from th = tanh(z/cap): w·(exp(cap·th − lse) − [target])·(1 − th²). Both
// backward layouts call it, so the fused pass writes the separate pass's bits for the same lse.
__device__ __forceinline__ float ce_grad(float th, float l, float cap, float w, bool target) {
  float g = expf(__fmaf_rn(cap, th, -l));
  if (target) g -= 1.f;
  return __fmul_rn(__fmul_rn(w, g), __fmaf_rn(-th, th, 1.f));
}

// Merges (m, s) pairs (running max, sum of exp(c − m)) across the 32 lanes: the same pair on every lane.
__device__ __forceinline__ void merge_warp(float& m, float& s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, offset), s_o = __shfl_xor_sync(0xffffffffu, s, offset);
    const float m_new = fmaxf(m, m_o);
    s = (m == -INFINITY ? 0.f : s * expf(m - m_new)) + (m_o == -INFINITY ? 0.f : s_o * expf(m_o - m_new));
    m = m_new;
  }
}

// One block per row (grid-stride over rows); K vectors of 8 logits per thread. dz (may alias z): written
// when not null, with weights[row] or uniform_weight.
template <int K>
__global__ void __launch_bounds__(kMaxRowThreads) softcap_ce_rows_kernel(const bf16* z, const int32_t* __restrict__ targets,
                                                                       float* __restrict__ losses,
                                                                       float* __restrict__ lse, int64_t N, int V,
                                                                       float cap, bf16* dz,
                                                                       const float* __restrict__ weights,
                                                                       float uniform_weight) {
  pdl_prologue();
  __shared__ float part_m[kMaxRowThreads / 32], part_s[kMaxRowThreads / 32];
  __shared__ float row_lse;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = static_cast<int>(blockDim.x >> 5);
  const int vecs = V / 8;
  const float inv_cap = 1.f / cap;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const bf16* zr = z + row * V;
    float th[K][8];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int j = static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x);
      if (j < vecs) {
        load8(zr + j * 8, th[i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          th[i][e] = tanhf(th[i][e] * inv_cap);
          m = fmaxf(m, __fmul_rn(cap, th[i][e]));
        }
      }
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x) < vecs) {
#pragma unroll
        for (int e = 0; e < 8; ++e) s += expf(__fmul_rn(cap, th[i][e]) - m);
      }
    merge_warp(m, s);
    if (lane == 0) part_m[warp] = m, part_s[warp] = s;
    __syncthreads();
    if (warp == 0) {
      m = lane < warps ? part_m[lane] : -INFINITY;
      s = lane < warps ? part_s[lane] : 0.f;
      merge_warp(m, s);
      if (lane == 0) {
        row_lse = m + logf(s);
        lse[row] = row_lse;
      }
    }
    __syncthreads();  // part_* are rewritten only after the next row's first barrier, row_lse after its second
    const float l = row_lse;
    const int t = targets[row];
    const float w = dz ? (weights ? weights[row] : uniform_weight) : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int j = static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x);
      if (j >= vecs) continue;
      // The target's capped logit from z (its owner reads it before it writes dz over it): picking it out
      // of th by a runtime index would move th to local memory.
      if (j == t >> 3) losses[row] = l - __fmul_rn(cap, tanhf(__bfloat162float(zr[t]) * inv_cap));
      if (!dz) continue;
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = ce_grad(th[i][e], l, cap, w, j * 8 + e == t);
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
      float vmax = -INFINITY;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[e] = cap * tanhf(v[e] * inv_cap);
        vmax = fmaxf(vmax, v[e]);
      }
      const float m_new = fmaxf(m, vmax);
      s *= expf(m - m_new);
#pragma unroll
      for (int e = 0; e < 8; ++e) s += expf(v[e] - m_new);
      m = m_new;
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
    const float w = weights ? weights[row] : uniform_weight, l = lse[row];
    const int t = targets[row];
    for (int f0 = lane * 8; f0 < V; f0 += 256) {
      float v[8];
      load8(z + row * V + f0, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = ce_grad(tanhf(v[e] * inv_cap), l, cap, w, f0 + e == t);
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

// The block-per-row layout of a vocabulary: vectors of 8 per thread (1, 2, 4 or 8: up to 256 threads
// before 8) and threads per row (whole warps).
struct RowLayout {
  int vecs_per_thread = 0, threads = 0;
};

RowLayout row_layout(int V) {
  const int vecs = V / 8;
  int k = 1;
  while (k < kMaxVecsPerThread && vecs > 256 * k) k *= 2;
  return RowLayout{k, ((vecs + k - 1) / k + 31) & ~31};
}

template <int K>
void launch_rows(const RowLayout& r, const bf16* z, const int32_t* targets, float* losses, float* lse, int64_t N, int V,
                 float cap, const CeGradient* grad, cudaStream_t stream) {
  // Resident blocks per multiprocessor, per layout (thread-safe, read once).
  static std::atomic<int> resident[kMaxRowThreads / 32 + 1];
  int per_sm = resident[r.threads / 32].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    PG_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, softcap_ce_rows_kernel<K>, r.threads, 0));
    PG_CUDA_REQUIRE(per_sm > 0, "softcap_ce: the row kernel does not fit a multiprocessor");
    resident[r.threads / 32].store(per_sm, std::memory_order_relaxed);
  }
  static const int sms = [] {
    int device = 0, count = 0;
    PG_CUDA_CHECK(cudaGetDevice(&device));
    PG_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }();
  const int blocks = static_cast<int>(std::min<int64_t>(N, int64_t{per_sm} * sms));
  launch_kernel(softcap_ce_rows_kernel<K>, blocks, r.threads, 0, stream, z, targets, losses, lse, N, V, cap,
                grad ? grad->dz : nullptr, grad ? grad->weights : nullptr, grad ? grad->uniform_weight : 0.f);
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
  const RowLayout r = row_layout(V);
  switch (r.vecs_per_thread) {
    case 1: launch_rows<1>(r, z, targets, losses, lse, N, V, cap, grad, stream); break;
    case 2: launch_rows<2>(r, z, targets, losses, lse, N, V, cap, grad, stream); break;
    case 4: launch_rows<4>(r, z, targets, losses, lse, N, V, cap, grad, stream); break;
    default: launch_rows<8>(r, z, targets, losses, lse, N, V, cap, grad, stream); break;
  }
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
