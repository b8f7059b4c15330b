// kLanes = Dh/8 neighbouring threads per (token, KV head), each holding 8 features of the head vectors in
// registers: 16-byte accesses that the warp completes into whole cache lines (the heads of consecutive
// items are contiguous), head dot products by shuffles among the kLanes threads. v̂ stays in registers
// for every query head of the group.
#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/xsa.h"

namespace pgolf::cuda {
namespace {

constexpr float kNormalizeEps = 1e-12f;  // F.normalize's default eps
constexpr int kXsaThreads = 128;

// Σ over the kLanes threads of an item (aligned groups of kLanes lanes; every lane of the warp takes part).
template <int kLanes>
__device__ __forceinline__ float item_sum(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int kLanes>
__device__ __forceinline__ float item_dot(const float (&a)[8], const float (&b)[8]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s += a[e] * b[e];
  return item_sum<kLanes>(s);
}

// The (token, KV head) items t = i·Hkv + g, 32/kLanes per warp and kLanes threads each: the loop is uniform
// over a warp (its shuffles need every lane) and `valid` marks the items past the end. part: this thread's
// 8-feature slice of the head.
#define PG_XSA_ITEMS(t, valid, part, items)                                                                   \
  const int part = static_cast<int>(threadIdx.x % 32) % kLanes;                                             \
  for (int first = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / 32) * (32 / kLanes);           \
       first < (items); first += static_cast<int>(gridDim.x * (blockDim.x / 32)) * (32 / kLanes))             \
    if (const int t = first + static_cast<int>(threadIdx.x % 32) / kLanes; true)                              \
      if (const bool valid = t < (items); true)

template <int kLanes>
__global__ void __launch_bounds__(kXsaThreads) xsa_forward_kernel(const bf16* __restrict__ y,
                                                                  const bf16* __restrict__ v,
                                                                  bf16* __restrict__ y_out, int items, int H, int Hkv) {
  pdl_prologue();
  constexpr int kDh = 8 * kLanes;
  const int group = H / Hkv;
  PG_XSA_ITEMS(t, valid, part, items) {
    const int64_t i = t / Hkv;  // 32-bit division: no 64-bit division routine
    const int g = t % Hkv;
    float vh[8] = {};
    if (valid) load8(v + int64_t{t} * kDh + part * 8, vh);
    const float norm = fmaxf(sqrtf(item_dot<kLanes>(vh, vh)), kNormalizeEps);
#pragma unroll
    for (int e = 0; e < 8; ++e) vh[e] /= norm;
    for (int hq = 0; hq < group; ++hq) {
      const int64_t at = (i * H + g * group + hq) * kDh + part * 8;
      float yv[8] = {};
      if (valid) load8(y + at, yv);
      const float c = item_dot<kLanes>(yv, vh);
#pragma unroll
      for (int e = 0; e < 8; ++e) yv[e] -= c * vh[e];
      if (valid) store8(y_out + at, yv);
    }
  }
}

// D = rowsum(dy_in ∘ y) of one head (head dim 64: 8 slices of 8) with attention_backward's operations
// (attention.h, attention_backward_delta): on the bf16 values as stored, a fused multiply-add chain per
// slice, the slices summed by xor 1, 2, 4.
__device__ __forceinline__ float attention_delta(const float (&y)[8], const float (&dy)[8]) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    sum = fmaf(y[2 * i], round_bf16(dy[2 * i]), fmaf(y[2 * i + 1], round_bf16(dy[2 * i + 1]), sum));
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  return sum;
}

template <int kLanes>
__global__ void __launch_bounds__(kXsaThreads) xsa_backward_kernel(const bf16* __restrict__ dy_out,
                                                                   const bf16* __restrict__ y,
                                                                   const bf16* __restrict__ v, bf16* __restrict__ dy_in,
                                                                   float* __restrict__ dv, float* __restrict__ delta,
                                                                   int items, int H, int Hkv) {
  pdl_prologue();
  constexpr int kDh = 8 * kLanes;
  const int group = H / Hkv;
  PG_XSA_ITEMS(t, valid, part, items) {
    const int64_t i = t / Hkv;  // 32-bit division: no 64-bit division routine
    const int g = t % Hkv;
    float vh[8] = {}, dvh[8] = {};
    if (valid) load8(v + int64_t{t} * kDh + part * 8, vh);
    const float raw_norm = sqrtf(item_dot<kLanes>(vh, vh));
    const bool clamped = raw_norm <= kNormalizeEps;
    const float norm = clamped ? kNormalizeEps : raw_norm;
#pragma unroll
    for (int e = 0; e < 8; ++e) vh[e] /= norm;
    for (int hq = 0; hq < group; ++hq) {
      const int64_t at = (i * H + g * group + hq) * kDh + part * 8;
      float yv[8] = {}, dyv[8] = {};
      if (valid) {
        load8(y + at, yv);
        load8(dy_out + at, dyv);
      }
      const float c = item_dot<kLanes>(yv, vh), e_dot = item_dot<kLanes>(dyv, vh);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dvh[e] -= c * dyv[e] + e_dot * yv[e];
        dyv[e] -= e_dot * vh[e];
      }
      if (valid) store8(dy_in + at, dyv);
      if constexpr (kLanes == 8) {
        if (delta) {
          const float d = attention_delta(yv, dyv);
          if (valid && part == 0) delta[static_cast<int64_t>(g * group + hq) * (items / Hkv) + i] = d;
        }
      }
    }
    const float vd = item_dot<kLanes>(vh, dvh);
#pragma unroll
    for (int e = 0; e < 8; ++e) dvh[e] = (dvh[e] - vh[e] * (clamped ? 0.f : vd)) / norm;
    if (valid) store8(dv + int64_t{t} * kDh + part * 8, dvh);
  }
}

template <typename F>
void dispatch_head_dim(int head_dim, const char* what, F&& launch) {
  switch (head_dim) {
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 16: launch(std::integral_constant<int, 16>{}); break;
    case 32: launch(std::integral_constant<int, 32>{}); break;
    case 64: launch(std::integral_constant<int, 64>{}); break;
    default: raise_error(what, __FILE__, __LINE__);
  }
}

}  // namespace

void xsa_forward(const bf16* y, const bf16* v, bf16* y_out, int64_t N, int H, int Hkv, int head_dim,
                 cudaStream_t stream) {
  PG_CUDA_REQUIRE(Hkv > 0 && H % Hkv == 0, "xsa_forward: kv_heads must divide heads");
  PG_CUDA_REQUIRE(N * Hkv * 8 < INT32_MAX, "xsa_forward: more than 2^28 (token, KV head) items");
  if (N == 0) return;
  dispatch_head_dim(head_dim, "xsa_forward: head_dim must be 8, 16, 32 or 64", [&](auto dh) {
    constexpr int kLanes = decltype(dh)::value / 8;
    launch_kernel(xsa_forward_kernel<kLanes>, item_blocks(N * Hkv * kLanes, kXsaThreads), kXsaThreads, 0, stream, y, v,
                  y_out, static_cast<int>(N * Hkv), H, Hkv);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void xsa_backward(const bf16* dy_out, const bf16* y, const bf16* v, bf16* dy_in, float* dv, int64_t N, int H, int Hkv,
                  int head_dim, cudaStream_t stream, float* delta) {
  PG_CUDA_REQUIRE(Hkv > 0 && H % Hkv == 0, "xsa_backward: kv_heads must divide heads");
  PG_CUDA_REQUIRE(!delta || head_dim == 64, "xsa_backward: D for the attention backward needs head_dim 64");
  PG_CUDA_REQUIRE(N * Hkv * 8 < INT32_MAX, "xsa_backward: more than 2^28 (token, KV head) items");
  if (N == 0) return;
  dispatch_head_dim(head_dim, "xsa_backward: head_dim must be 8, 16, 32 or 64", [&](auto dh) {
    constexpr int kLanes = decltype(dh)::value / 8;
    launch_kernel(xsa_backward_kernel<kLanes>, item_blocks(N * Hkv * kLanes, kXsaThreads), kXsaThreads, 0, stream,
                  dy_out, y, v, dy_in, dv, delta, static_cast<int>(N * Hkv), H, Hkv);
  });
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
