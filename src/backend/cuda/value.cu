// One thread per 8 values of one token's kv row (vector loads from the strided projection output).
#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/value.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

#define PG_KV_VECS(t, i, c, s)                                                                          \
  const int64_t vecs_per_row_ = (s).kv_dim / 8, total_vecs_ = (s).tokens * vecs_per_row_;                 \
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total_vecs_;          \
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)                                                 \
    if (const int64_t i = t / vecs_per_row_, c = (t % vecs_per_row_) * 8; true)

__global__ void value_forward_kernel(const bf16* __restrict__ v_lin, int64_t in_stride, const bf16* __restrict__ ve,
                                     const float* __restrict__ ve_lambda, const bf16* __restrict__ v0,
                                     const float* __restrict__ vr_lambda, bf16* __restrict__ v_raw,
                                     bf16* __restrict__ v, const ValueShape s) {
  pdl_prologue();
  const float lve = ve ? *ve_lambda : 0.f;
  const float l0 = vr_lambda ? vr_lambda[0] : 0.f, l1 = vr_lambda ? vr_lambda[1] : 0.f;
  PG_KV_VECS(t, i, c, s) {
    float a[8];
    load8(v_lin + i * in_stride + c, a);
    if (ve) {
      float b[8];
      load8(ve + i * s.kv_dim + c, b);
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] = round_bf16(a[e] + lve * b[e]);  // v_raw as stored
    }
    store8(v_raw + i * s.kv_dim + c, a);
    if (!vr_lambda) continue;
    float o[8];
    if (v0) {
      float b[8];
      load8(v0 + i * s.kv_dim + c, b);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = l0 * b[e] + l1 * a[e];
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = a[e] * (l0 + l1);
    }
    store8(v + i * s.kv_dim + c, o);
  }
}

// partials per block: [Σ dv⊙v0, Σ dv⊙v_raw, Σ dv_raw⊙ve]
__global__ void value_backward_kernel(const bf16* __restrict__ dv_attn, const float* __restrict__ dv_extra,
                                      const bf16* __restrict__ v_raw, const bf16* __restrict__ v0,
                                      const float* __restrict__ vr_lambda, float* __restrict__ dv0_acc,
                                      const float* __restrict__ dv0_add, const bf16* __restrict__ ve,
                                      const float* __restrict__ ve_lambda, float* __restrict__ dve,
                                      bf16* __restrict__ dv_lin, int64_t out_stride, float* __restrict__ partials,
                                      const ValueShape s, const ValueGradStart start) {
  pdl_prologue();
  __shared__ float smem[32];
  const float lve = ve ? *ve_lambda : 0.f;
  const float l0 = vr_lambda ? vr_lambda[0] : 0.f, l1 = vr_lambda ? vr_lambda[1] : 0.f;
  float sum_v0 = 0.f, sum_vraw = 0.f, sum_ve = 0.f;
  PG_KV_VECS(t, i, c, s) {
    const int64_t at = i * s.kv_dim + c;
    float d[8], raw[8], out[8];
    load8(dv_attn + at, d);
    if (dv_extra) {
      float x[8];
      load8(dv_extra + at, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) d[e] += x[e];
    }
    if (vr_lambda) {
      load8(v_raw + at, raw);
      if (v0) {
        float b[8], acc[8] = {};  // fresh: 0 + λ0·dv, as on a cleared accumulator
        load8(v0 + at, b);
        if (!start.dv0_fresh) load8(dv0_acc + at, acc);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sum_v0 += d[e] * b[e];
          sum_vraw += d[e] * raw[e];
          acc[e] += l0 * d[e];
          out[e] = l1 * d[e];
        }
        store8(dv0_acc + at, acc);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sum_vraw += d[e] * raw[e];
          out[e] = (l0 + l1) * d[e];
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = d[e];
    }
    if (dv0_add) {
      float b[8];
      load8(dv0_add + at, b);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] += b[e];
    }
    if (ve) {
      float b[8], acc[8] = {};
      load8(ve + at, b);
      if (dve && !start.dve_fresh) load8(dve + at, acc);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        sum_ve += out[e] * b[e];
        acc[e] += lve * out[e];
      }
      if (dve) store8(dve + at, acc);
    }
    store8(dv_lin + i * out_stride + c, out);
  }
  if (!partials) return;
  store_scalar_partial(sum_v0, smem, partials + blockIdx.x * 3);
  store_scalar_partial(sum_vraw, smem, partials + blockIdx.x * 3 + 1);
  store_scalar_partial(sum_ve, smem, partials + blockIdx.x * 3 + 2);
}

int grid_of(const ValueShape& s) { return item_blocks(s.tokens * (s.kv_dim / 8), kThreads, kMaxRowBlocks); }

}  // namespace

size_t value_workspace_floats(const ValueShape& shape) { return static_cast<size_t>(grid_of(shape)) * 3; }

void value_forward(const bf16* v_lin, int64_t in_stride, const bf16* ve, const float* ve_lambda, const bf16* v0,
                   const float* vr_lambda, bf16* v_raw, bf16* v, const ValueShape& s, cudaStream_t stream) {
  PG_CUDA_REQUIRE(s.kv_dim > 0 && s.kv_dim % 8 == 0, "value_forward: kv_dim must be a positive multiple of 8");
  PG_CUDA_REQUIRE((ve == nullptr) == (ve_lambda == nullptr), "value_forward: ve and ve_lambda come together");
  if (s.tokens == 0) return;
  launch_kernel(value_forward_kernel, item_blocks(s.tokens * (s.kv_dim / 8), kThreads), kThreads, 0, stream, v_lin,
                in_stride, ve, ve_lambda, v0, vr_lambda, v_raw, v, s);
  PG_CUDA_LAUNCH_CHECK();
}

void value_backward(const bf16* dv_attn, const float* dv_extra, const bf16* v_raw, const bf16* v0,
                    const float* vr_lambda, float* dv0_acc, const float* dv0_add, const bf16* ve,
                    const float* ve_lambda, float* dve, float* dvr_lambda, float* dve_lambda, bf16* dv_lin,
                    int64_t out_stride, const ValueShape& s, const ReduceWorkspace& ws, cudaStream_t stream,
                    ValueGradStart start) {
  PG_CUDA_REQUIRE(s.kv_dim > 0 && s.kv_dim % 8 == 0, "value_backward: kv_dim must be a positive multiple of 8");
  PG_CUDA_REQUIRE(!v0 || dv0_acc, "value_backward: a layer mixing v0 needs the v0 gradient accumulator");
  PG_CUDA_REQUIRE(ve || !dve, "value_backward: dve needs ve");
  if (s.tokens == 0) return;
  const int blocks = grid_of(s);
  const bool want_vr = dvr_lambda != nullptr && vr_lambda != nullptr, want_ve = dve_lambda != nullptr && ve;
  if (want_vr || want_ve) check_reduce_workspace(ws, blocks, 3, "value_backward");
  launch_kernel(value_backward_kernel, blocks, kThreads, 0, stream, dv_attn, dv_extra, v_raw, v0, vr_lambda, dv0_acc,
                dv0_add, ve, ve_lambda, dve, dv_lin, out_stride, want_vr || want_ve ? ws.data : nullptr, s, start);
  PG_CUDA_LAUNCH_CHECK();
  if (!want_vr && !want_ve) return;
  // Without v0 both lambdas receive Σ dv⊙v_raw (the first layer's (λ0+λ1) scale). Every target list
  // spans the whole partial row (3 columns): its total width is the row stride.
  if (want_vr && !v0) {
    finish_partial_sums(ws.data, blocks, {{nullptr, 1}, {dvr_lambda, 1}, {want_ve ? dve_lambda : nullptr, 1}}, stream);
    finish_partial_sums(ws.data, blocks, {{nullptr, 1}, {dvr_lambda + 1, 1}, {nullptr, 1}}, stream);
  } else {
    finish_partial_sums(ws.data, blocks, {{want_vr ? dvr_lambda : nullptr, 2}, {want_ve ? dve_lambda : nullptr, 1}},
                        stream);
  }
}

}  // namespace pgolf::cuda
