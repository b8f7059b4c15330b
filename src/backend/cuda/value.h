// The value path of an attention layer on the device (twins: cpu::scaled_add_* for the value
// embedding, cpu::value_mix_* for the value residual): from the v columns of the fused projection
//   v_raw = v_lin + λ_ve·ve                         (VE layers; otherwise v_raw = v_lin)
//   v     = λ0·v0 + λ1·v_raw, or (λ0+λ1)·v_raw when v0 is null   (value residual; otherwise v = v_raw)
// [N, kv_dim] rows; kv_dim a multiple of 8. λ_ve and λ = vr_lambda [2] are device parameters.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {

struct ValueShape {
  int64_t tokens = 0;
  int kv_dim = 0;
};

// v_raw is written contiguous; v only when vr_lambda is given (the mix), else unused. ve/ve_lambda
// and v0 may be null.
void value_forward(const __nv_bfloat16* v_lin, int64_t in_stride, const __nv_bfloat16* ve, const float* ve_lambda,
                   const __nv_bfloat16* v0, const float* vr_lambda, __nv_bfloat16* v_raw, __nv_bfloat16* v,
                   const ValueShape& shape, cudaStream_t stream);

// dv = dv_attn (bf16, attention's) + dv_extra (fp32, XSA's; may be null) is the gradient of the
// tensor attention read (v with the mix, v_raw without). Then
//   mix:  dv_raw = λ1·dv (v0 given) or (λ0+λ1)·dv; dv0_acc += λ0·dv; dvr_lambda += [Σ dv⊙v0, Σ dv⊙v_raw]
//         (both += Σ dv⊙v_raw without v0);   no mix (vr_lambda null): dv_raw = dv;
//   dv_raw += dv0_add (the first layer: the v0 gradient the later layers accumulated; may be null);
//   VE:   dve += λ_ve·dv_raw (fp32), dve_lambda += Σ dv_raw⊙ve;
// and dv_raw is written (bf16, row stride out_stride) as the gradient of the projection's v columns.
// Gradient pointers of parameters may be null (frozen), and so may dve (no VE gradient: the sum for
// dve_lambda is still formed). `start`: accumulators written rather than added to.
struct ValueGradStart {
  bool dv0_fresh = false;  // dv0_acc = λ0·dv, not read: the backward's first layer that adds to it
  bool dve_fresh = false;  // dve = λ_ve·dv_raw, not read: likewise
};
void value_backward(const __nv_bfloat16* dv_attn, const float* dv_extra, const __nv_bfloat16* v_raw,
                    const __nv_bfloat16* v0, const float* vr_lambda, float* dv0_acc, const float* dv0_add,
                    const __nv_bfloat16* ve, const float* ve_lambda, float* dve, float* dvr_lambda, float* dve_lambda,
                    __nv_bfloat16* dv_lin, int64_t out_stride, const ValueShape& shape, const ReduceWorkspace& ws,
                    cudaStream_t stream, ValueGradStart start = {});

size_t value_workspace_floats(const ValueShape& shape);

}  // namespace pgolf::cuda
