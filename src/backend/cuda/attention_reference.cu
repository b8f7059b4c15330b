#include <cmath>

#include "backend/cuda/attention_reference.h"
#include "backend/cuda/check.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

constexpr int kWarps = 4;

struct RefParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const int32_t* cu;
  int num_segments, N, H, Hkv, Dh, max_seqlen;
  float scale;
};

// The first token of the segment holding token i (the last segment starting at or before i; empty
// segments share their start with the next one and are skipped that way).
__device__ __forceinline__ int segment_start(const int32_t* cu, int num_segments, int i) {
  int lo = 0, hi = num_segments - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= i) lo = mid;
    else hi = mid - 1;
  }
  return cu[lo];
}

__device__ __forceinline__ float dot_row(const float* a, const bf16* b, int n) {
  float s = 0.f;
  for (int d = 0; d < n; d += 8) {
    float x[8];
    load8(b + d, x);
#pragma unroll
    for (int e = 0; e < 8; ++e) s += a[d + e] * x[e];
  }
  return s;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__global__ void __launch_bounds__(kWarps * 32) reference_forward_kernel(const RefParams p, bf16* __restrict__ o,
                                                                        float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* qs = smem + warp * (p.Dh + p.max_seqlen);
  float* sc = qs + p.Dh;
  const int group = p.H / p.Hkv;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp; item < static_cast<int64_t>(p.N) * p.H;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int i = static_cast<int>(item / p.H), h = static_cast<int>(item % p.H), g = h / group;
    const int start = segment_start(p.cu, p.num_segments, i), len = i - start + 1;
    for (int d = lane; d < p.Dh; d += 32) qs[d] = __bfloat162float(p.q[item * p.Dh + d]);
    __syncwarp();
    float m = -INFINITY;
    for (int j = lane; j < len; j += 32) {
      const float s = p.scale * dot_row(qs, p.k + (static_cast<int64_t>(start + j) * p.Hkv + g) * p.Dh, p.Dh);
      sc[j] = s;
      m = fmaxf(m, s);
    }
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < len; j += 32) sum += expf(sc[j] - m);
    const float l = m + logf(warp_sum(sum));
    for (int j = lane; j < len; j += 32) sc[j] = expf(sc[j] - l);
    __syncwarp();
    for (int d = lane; d < p.Dh; d += 32) {
      float acc = 0.f;
      for (int j = 0; j < len; ++j)
        acc += sc[j] * __bfloat162float(p.v[(static_cast<int64_t>(start + j) * p.Hkv + g) * p.Dh + d]);
      o[item * p.Dh + d] = __float2bfloat16(acc);
    }
    if (lane == 0) lse[static_cast<int64_t>(h) * p.N + i] = l;
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kWarps * 32) reference_backward_kernel(const RefParams p, const bf16* __restrict__ o,
                                                                         const float* __restrict__ lse,
                                                                         const bf16* __restrict__ d_o,
                                                                         bf16* __restrict__ dq, float* __restrict__ dk_acc,
                                                                         float* __restrict__ dv_acc) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* qs = smem + warp * (2 * p.Dh + 2 * p.max_seqlen);
  float* gs = qs + p.Dh;   // dO row
  float* ps = gs + p.Dh;   // P row
  float* dss = ps + p.max_seqlen;  // dS row (scale included)
  const int group = p.H / p.Hkv;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp; item < static_cast<int64_t>(p.N) * p.H;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int i = static_cast<int>(item / p.H), h = static_cast<int>(item % p.H), g = h / group;
    const int start = segment_start(p.cu, p.num_segments, i), len = i - start + 1;
    float delta = 0.f;
    for (int d = lane; d < p.Dh; d += 32) {
      qs[d] = __bfloat162float(p.q[item * p.Dh + d]);
      gs[d] = __bfloat162float(d_o[item * p.Dh + d]);
      delta += gs[d] * __bfloat162float(o[item * p.Dh + d]);
    }
    delta = warp_sum(delta);
    __syncwarp();
    const float l = lse[static_cast<int64_t>(h) * p.N + i];
    for (int j = lane; j < len; j += 32) {
      const int64_t kv = (static_cast<int64_t>(start + j) * p.Hkv + g) * p.Dh;
      const float prob = expf(p.scale * dot_row(qs, p.k + kv, p.Dh) - l);
      const float dp = dot_row(gs, p.v + kv, p.Dh);
      ps[j] = prob;
      dss[j] = prob * (dp - delta) * p.scale;
    }
    __syncwarp();
    for (int d = lane; d < p.Dh; d += 32) {
      float acc = 0.f;
      for (int j = 0; j < len; ++j)
        acc += dss[j] * __bfloat162float(p.k[(static_cast<int64_t>(start + j) * p.Hkv + g) * p.Dh + d]);
      dq[item * p.Dh + d] = __float2bfloat16(acc);
    }
    for (int64_t t = lane; t < static_cast<int64_t>(len) * p.Dh; t += 32) {
      const int j = static_cast<int>(t / p.Dh), d = static_cast<int>(t % p.Dh);
      const int64_t kv = (static_cast<int64_t>(start + j) * p.Hkv + g) * p.Dh + d;
      atomicAdd(dk_acc + kv, dss[j] * qs[d]);
      atomicAdd(dv_acc + kv, ps[j] * gs[d]);
    }
    __syncwarp();
  }
}

__global__ void to_bf16_kernel(const float* __restrict__ in, bf16* __restrict__ out, int64_t n) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[t] = __float2bfloat16(in[t]);
}

RefParams make_params(const AttentionShape& s, int head_dim, int max_seqlen, const bf16* q, const bf16* k,
                      const bf16* v) {
  PG_CUDA_REQUIRE(s.num_heads > 0 && s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0,
                  "attention_reference: num_kv_heads must divide num_heads");
  PG_CUDA_REQUIRE(s.num_segments >= 1 && s.cu_seqlens, "attention_reference: cu_seqlens must be given");
  PG_CUDA_REQUIRE(head_dim > 0 && head_dim % 8 == 0 && head_dim <= 64,
                  "attention_reference: head_dim must be a multiple of 8, at most 64");
  PG_CUDA_REQUIRE(max_seqlen > 0, "attention_reference: max_seqlen must be positive");
  return RefParams{q, k, v, s.cu_seqlens, s.num_segments, s.total_tokens, s.num_heads, s.num_kv_heads, head_dim,
                   max_seqlen, 1.f / sqrtf(static_cast<float>(head_dim))};
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  PG_CUDA_REQUIRE(bytes <= 227 * 1024, "attention_reference: max_seqlen too long for shared memory");
  if (bytes > 48 * 1024) PG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                            static_cast<int>(bytes)));
}

}  // namespace

void attention_reference_forward(const AttentionShape& s, int head_dim, int max_seqlen, const bf16* q, const bf16* k,
                                 const bf16* v, bf16* o, float* lse, cudaStream_t stream) {
  const RefParams p = make_params(s, head_dim, max_seqlen, q, k, v);
  if (s.total_tokens == 0) return;
  const size_t smem = static_cast<size_t>(kWarps) * (head_dim + max_seqlen) * sizeof(float);
  set_smem(reference_forward_kernel, smem);
  reference_forward_kernel<<<item_blocks(static_cast<int64_t>(s.total_tokens) * s.num_heads, kWarps), kWarps * 32,
                             smem, stream>>>(p, o, lse);
  PG_CUDA_LAUNCH_CHECK();
}

size_t attention_reference_workspace_bytes(const AttentionShape& s, int head_dim) {
  return 2 * static_cast<size_t>(s.total_tokens) * s.num_kv_heads * head_dim * sizeof(float);
}

void attention_reference_backward(const AttentionShape& s, int head_dim, int max_seqlen, const bf16* q, const bf16* k,
                                  const bf16* v, const bf16* o, const float* lse, const bf16* d_o, bf16* dq, bf16* dk,
                                  bf16* dv, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const RefParams p = make_params(s, head_dim, max_seqlen, q, k, v);
  if (s.total_tokens == 0) return;
  PG_CUDA_REQUIRE(workspace && workspace_bytes >= attention_reference_workspace_bytes(s, head_dim),
                  "attention_reference_backward: workspace smaller than attention_reference_workspace_bytes");
  const int64_t kv_count = static_cast<int64_t>(s.total_tokens) * s.num_kv_heads * head_dim;
  float* dk_acc = static_cast<float*>(workspace);
  float* dv_acc = dk_acc + kv_count;
  PG_CUDA_CHECK(cudaMemsetAsync(workspace, 0, attention_reference_workspace_bytes(s, head_dim), stream));
  const size_t smem = static_cast<size_t>(kWarps) * (2 * head_dim + 2 * max_seqlen) * sizeof(float);
  set_smem(reference_backward_kernel, smem);
  reference_backward_kernel<<<item_blocks(static_cast<int64_t>(s.total_tokens) * s.num_heads, kWarps), kWarps * 32,
                              smem, stream>>>(p, o, lse, d_o, dq, dk_acc, dv_acc);
  PG_CUDA_LAUNCH_CHECK();
  to_bf16_kernel<<<item_blocks(kv_count, 256), 256, 0, stream>>>(dk_acc, dk, kv_count);
  PG_CUDA_LAUNCH_CHECK();
  to_bf16_kernel<<<item_blocks(kv_count, 256), 256, 0, stream>>>(dv_acc, dv, kv_count);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
