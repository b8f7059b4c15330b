// One thread per (token, KV head): v̂ stays in registers for every query head of the group.
#include "backend/cuda/check.h"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/xsa.h"

namespace pgolf::cuda {
namespace {

constexpr float kNormalizeEps = 1e-12f;  // F.normalize's default eps

template <int kDh>
__device__ __forceinline__ void load_head(const bf16* p, float (&v)[kDh]) {
#pragma unroll
  for (int c = 0; c < kDh; c += 8) {
    float x[8];
    load8(p + c, x);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[c + e] = x[e];
  }
}

template <int kDh, typename Out>
__device__ __forceinline__ void store_head(Out* p, const float (&v)[kDh]) {
#pragma unroll
  for (int c = 0; c < kDh; c += 8) {
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = v[c + e];
    store8(p + c, x);
  }
}

template <int kDh>
__device__ __forceinline__ float dot(const float (&a)[kDh], const float (&b)[kDh]) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kDh; ++j) s += a[j] * b[j];
  return s;
}

template <int kDh>
__global__ void xsa_forward_kernel(const bf16* __restrict__ y, const bf16* __restrict__ v, bf16* __restrict__ y_out,
                                   int64_t N, int H, int Hkv) {
  const int group = H / Hkv;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < N * Hkv;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / Hkv;
    const int g = static_cast<int>(t % Hkv);
    float vh[kDh];
    load_head<kDh>(v + t * kDh, vh);
    const float norm = fmaxf(sqrtf(dot<kDh>(vh, vh)), kNormalizeEps);
#pragma unroll
    for (int j = 0; j < kDh; ++j) vh[j] /= norm;
    for (int hq = 0; hq < group; ++hq) {
      const int64_t row = i * H + g * group + hq;
      float yv[kDh];
      load_head<kDh>(y + row * kDh, yv);
      const float c = dot<kDh>(yv, vh);
#pragma unroll
      for (int j = 0; j < kDh; ++j) yv[j] -= c * vh[j];
      store_head<kDh>(y_out + row * kDh, yv);
    }
  }
}

template <int kDh>
__global__ void xsa_backward_kernel(const bf16* __restrict__ dy_out, const bf16* __restrict__ y,
                                    const bf16* __restrict__ v, bf16* __restrict__ dy_in, float* __restrict__ dv,
                                    int64_t N, int H, int Hkv) {
  const int group = H / Hkv;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < N * Hkv;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / Hkv;
    const int g = static_cast<int>(t % Hkv);
    float vh[kDh], dvh[kDh] = {};
    load_head<kDh>(v + t * kDh, vh);
    const float raw_norm = sqrtf(dot<kDh>(vh, vh));
    const bool clamped = raw_norm <= kNormalizeEps;
    const float norm = clamped ? kNormalizeEps : raw_norm;
#pragma unroll
    for (int j = 0; j < kDh; ++j) vh[j] /= norm;
    for (int hq = 0; hq < group; ++hq) {
      const int64_t row = i * H + g * group + hq;
      float yv[kDh], dyv[kDh];
      load_head<kDh>(y + row * kDh, yv);
      load_head<kDh>(dy_out + row * kDh, dyv);
      const float c = dot<kDh>(yv, vh), e = dot<kDh>(dyv, vh);
#pragma unroll
      for (int j = 0; j < kDh; ++j) {
        dvh[j] -= c * dyv[j] + e * yv[j];
        dyv[j] -= e * vh[j];
      }
      store_head<kDh>(dy_in + row * kDh, dyv);
    }
    const float vd = clamped ? 0.f : dot<kDh>(vh, dvh);
#pragma unroll
    for (int j = 0; j < kDh; ++j) dvh[j] = (dvh[j] - vh[j] * vd) / norm;
    store_head<kDh>(dv + t * kDh, dvh);
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
  if (N == 0) return;
  const int threads = 128;
  dispatch_head_dim(head_dim, "xsa_forward: head_dim must be 8, 16, 32 or 64", [&](auto dh) {
    xsa_forward_kernel<decltype(dh)::value><<<item_blocks(N * Hkv, threads), threads, 0, stream>>>(y, v, y_out, N, H,
                                                                                                   Hkv);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void xsa_backward(const bf16* dy_out, const bf16* y, const bf16* v, bf16* dy_in, float* dv, int64_t N, int H, int Hkv,
                  int head_dim, cudaStream_t stream) {
  PG_CUDA_REQUIRE(Hkv > 0 && H % Hkv == 0, "xsa_backward: kv_heads must divide heads");
  if (N == 0) return;
  const int threads = 128;
  dispatch_head_dim(head_dim, "xsa_backward: head_dim must be 8, 16, 32 or 64", [&](auto dh) {
    xsa_backward_kernel<decltype(dh)::value><<<item_blocks(N * Hkv, threads), threads, 0, stream>>>(dy_out, y, v,
                                                                                                    dy_in, dv, N, H, Hkv);
  });
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
