// One thread per (token, head) vector; 64 threads per block and a grid stride that is a multiple of
// 64 keep each thread on one head, so the bias gradient reduces per thread, then per block in order.
#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/head_gate.h"
#include "backend/cuda/kernel_util.cuh"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 64;
constexpr int kMaxBlocks = 2048;

__global__ void __launch_bounds__(kThreads) head_gate_forward_kernel(const bf16* y_in, const float* __restrict__ logits,
                                                                     const float* __restrict__ bias,
                                                                     float* __restrict__ gate, bf16* y_out,
                                                                     const HeadGateShape s) {
  pdl_prologue();
  const int Dh = s.head_dim;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < s.tokens * s.heads;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = r / s.heads;
    const int h = static_cast<int>(r % s.heads);
    const float g = sigmoidf_(logits[i * s.logits_ld + h] + (bias ? bias[h] : 0.f));
    gate[r] = g;
    for (int c = 0; c < Dh; c += 8) {
      float v[8];
      load8(y_in + r * Dh + c, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] *= g;
      store8(y_out + r * Dh + c, v);
    }
  }
}

__global__ void __launch_bounds__(kThreads) head_gate_backward_kernel(const bf16* __restrict__ dy_out,
                                                                      const bf16* __restrict__ y_in,
                                                                      const float* __restrict__ gate,
                                                                      bf16* __restrict__ dy_in,
                                                                      bf16* __restrict__ dlogits,
                                                                      float* __restrict__ partials,
                                                                      const HeadGateShape s) {
  pdl_prologue();
  __shared__ float smem[kThreads];
  const int Dh = s.head_dim;
  float bias_acc = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < s.tokens * s.heads;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = r / s.heads;
    const int h = static_cast<int>(r % s.heads);
    const float g = gate[r];
    float dg = 0.f;
    for (int c = 0; c < Dh; c += 8) {
      float d[8], y[8];
      load8(dy_out + r * Dh + c, d);
      load8(y_in + r * Dh + c, y);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dg += d[e] * y[e];
        d[e] *= g;
      }
      store8(dy_in + r * Dh + c, d);
    }
    const float dl = dg * g * (1.f - g);
    bias_acc += dl;
    dlogits[i * s.logits_ld + h] = __float2bfloat16(dl);
    if (h == 0)
      for (int64_t c = s.heads; c < s.logits_ld; ++c) dlogits[i * s.logits_ld + c] = __float2bfloat16(0.f);
  }
  if (!partials) return;
  smem[threadIdx.x] = bias_acc;
  __syncthreads();
  if (threadIdx.x < s.heads) {
    float sum = 0.f;
    for (int t = threadIdx.x; t < kThreads; t += s.heads) sum += smem[t];
    partials[static_cast<size_t>(blockIdx.x) * s.heads + threadIdx.x] = sum;
  }
}

int grid_of(const HeadGateShape& s) { return item_blocks(s.tokens * s.heads, kThreads, kMaxBlocks); }

void check_shape(const HeadGateShape& s, const char* what) {
  PG_CUDA_REQUIRE(s.heads > 0 && kThreads % s.heads == 0 && s.head_dim % 8 == 0 && s.logits_ld >= s.heads, what);
}

}  // namespace

size_t head_gate_workspace_floats(const HeadGateShape& shape) {
  return static_cast<size_t>(grid_of(shape)) * shape.heads;
}

void head_gate_forward(const bf16* y_in, const float* logits, const float* bias, float* gate, bf16* y_out,
                       const HeadGateShape& s, cudaStream_t stream) {
  check_shape(s, "head_gate_forward: heads must divide 64, head_dim be a multiple of 8, logits_ld >= heads");
  if (s.tokens == 0) return;
  launch_kernel(head_gate_forward_kernel, grid_of(s), kThreads, 0, stream, y_in, logits, bias, gate, y_out, s);
  PG_CUDA_LAUNCH_CHECK();
}

void head_gate_backward(const bf16* dy_out, const bf16* y_in, const float* gate, bf16* dy_in, bf16* dlogits,
                        float* dbias, const HeadGateShape& s, const ReduceWorkspace& ws, cudaStream_t stream) {
  check_shape(s, "head_gate_backward: heads must divide 64, head_dim be a multiple of 8, logits_ld >= heads");
  if (s.tokens == 0) return;
  const int blocks = grid_of(s);
  if (dbias) check_reduce_workspace(ws, blocks, s.heads, "head_gate_backward");
  launch_kernel(head_gate_backward_kernel, blocks, kThreads, 0, stream, dy_out, y_in, gate, dy_in, dlogits,
                dbias ? ws.data : nullptr, s);
  PG_CUDA_LAUNCH_CHECK();
  if (dbias) finish_partial_sums(ws.data, blocks, {{dbias, s.heads}}, stream);
}

}  // namespace pgolf::cuda
