// The residual-stream ops of a block on the device (twins of cpu/mixing.h and cpu/rmsnorm.h, fused
// where one pass over the rows can do the work of several CPU ops). Activations are bf16 [rows, dim]
// token rows, running gradients fp32; per-feature parameters are fp32 [dim] (any alignment).
// Parameter gradients are reduced without atomics (partial_sums.h) and accumulated (+=); a null
// gradient pointer skips that reduction (frozen weights). dim: a multiple of 8, at most 1024.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/norm_grad.h"
#include "backend/cuda/partial_sums.h"

namespace pgolf::cuda {

// The residual updates between the layer below and this layer's mix, folded into the mix's pass to save
// a write and a read of each intermediate: the layer below's MLP branch, branch_forward without a norm,
//   out = x_mid + branch_scale⊙(σ(gate)⊙a)   (stored bf16),
// then, with s given, the U-Net skip of skip_forward, in = skip(out, s, w, skip_gate) (stored bf16);
// the mix then takes in (or out) as its x. The same bits as the separate passes. out and in may be null
// (not stored) where nothing reads them later (an evaluation forward).
struct ResidualBelow {
  const __nv_bfloat16* x_mid = nullptr;
  const __nv_bfloat16* a = nullptr;
  const float* branch_scale = nullptr;
  const float* gate = nullptr;  // null: σ = 1
  __nv_bfloat16* out = nullptr;
  const __nv_bfloat16* s = nullptr;  // null: no skip
  const float* w = nullptr;
  const float* skip_gate = nullptr;
  __nv_bfloat16* in = nullptr;
};

// resid_mix + RMSNorm: x_in = mix[0]⊙x + mix[1]⊙x0 (stored bf16), n = RMSNorm(x_in)·scale, rstd [rows].
// With `below`, x is what its updates produce (x itself is not read: pass null).
void mix_norm_forward(const __nv_bfloat16* x, const __nv_bfloat16* x0, const float* mix, __nv_bfloat16* x_in,
                      __nv_bfloat16* n, float* rstd, int64_t rows, int dim, float scale, cudaStream_t stream,
                      const ResidualBelow* below = nullptr);

// The MLP-branch backward of the layer below (branch_backward without dn), folded into mix_norm_backward,
// the pass that writes that branch's output gradient, to save a read of it: with t = dx as written
// (+ g_add when given; dx stores the sum), da = branch_scale⊙σ(gate)⊙t (bf16),
// dscale += σ⊙Σ t⊙a, dgate += branch_scale⊙σ(1−σ)⊙Σ t⊙a (null: skipped).
struct BranchBelow {
  const __nv_bfloat16* a = nullptr;
  const float* branch_scale = nullptr;
  const float* gate = nullptr;
  const float* g_add = nullptr;
  __nv_bfloat16* da = nullptr;
  float* dscale = nullptr;
  float* dgate = nullptr;
};

// The backward of the U-Net skip into this layer, in = x + w⊙s or lerp(w⊙s, x, σ(gate)), folded into
// mix_norm_backward, the pass that writes d in (skip_backward's work, to save a read and a write of it):
// with o = dx as formed, ds = (1−σ)⊙w⊙o (fp32), dw += (1−σ)⊙Σ o⊙s, dgate += σ(1−σ)⊙Σ o⊙(x − w⊙s), and dx
// stores σ⊙o (d x; o itself without a gate). Null dw / dgate: skipped. The same bits as skip_backward after
// the pass.
struct SkipBelow {
  const __nv_bfloat16* s = nullptr;
  const float* w = nullptr;
  float* ds = nullptr;
  float* dw = nullptr;
  const float* gate = nullptr;          // null: a plain skip
  const __nv_bfloat16* x = nullptr;     // the input before the skip (gated only)
  float* dgate = nullptr;
};

// What mix_norm_backward does with dx0 besides dx0 += mix[1]⊙t. fresh: dx0 is not read (dx0 = mix[1]⊙t:
// the first layer of a backward, so no pass clears it); takes_dx: dx (as it would be stored, after the
// branch and skip below) is added to dx0 and not stored (the last layer, whose input x is x0: the
// model's closing dx0 += dx pass, folded in with the same fp32 addition).
struct Dx0Pass {
  bool fresh = false;
  bool takes_dx = false;
};

// dn: fp32 or bf16 rows (norm_grad.h).
// t = (g_in ? g_in : 0) + RMSNorm backward of dn (through x_in, recomputed from x and x0 with the
// forward's roundings: the same bits as the stored x_in, not read back);
// dx = (accumulate_dx ? dx : 0) + mix[0]⊙t; dx0 += mix[1]⊙t (see Dx0Pass; a null dx0: no x0 gradient);
// dmix [2, dim] += [Σ t⊙x, Σ t⊙x0].
// g_in may alias dx (read before written, element by element). below: see BranchBelow; skip: see SkipBelow
// (not with a below.g_add).
void mix_norm_backward(NormGrad dn, const float* g_in, const float* rstd, const __nv_bfloat16* x,
                       const __nv_bfloat16* x0, const float* mix, float* dx, bool accumulate_dx, float* dx0,
                       float* dmix, int64_t rows, int dim, float scale, const ReduceWorkspace& ws,
                       cudaStream_t stream, const BranchBelow* below = nullptr, const SkipBelow* skip = nullptr,
                       Dx0Pass dx0_pass = {});

// Residual branch (+ RMSNorm of the result when n is given):
//   out = (x ? x : 0) + branch_scale⊙(σ(gate)⊙a)   (gate null: σ = 1), stored bf16;
//   n = RMSNorm(out)·norm_scale, rstd.
void branch_forward(const __nv_bfloat16* x, const __nv_bfloat16* a, const float* branch_scale, const float* gate,
                    __nv_bfloat16* out, __nv_bfloat16* n, float* rstd, int64_t rows, int dim, float norm_scale,
                    cudaStream_t stream);

// g holds d out. With g_add: g += g_add first (a second gradient of out, e.g. through a U-Net skip:
// one pass instead of a separate add). With dn (fp32 or bf16 rows): g += RMSNorm backward of dn (through
// the stored out).
// g is stored back when either is given. Then da = branch_scale⊙σ⊙g (bf16), dscale += σ⊙Σ g⊙a,
// dgate += branch_scale⊙σ(1−σ)⊙Σ g⊙a.
void branch_backward(NormGrad dn, float* g, const float* g_add, const __nv_bfloat16* out, const float* rstd,
                     const __nv_bfloat16* a, const float* branch_scale, const float* gate, __nv_bfloat16* da,
                     float* dscale, float* dgate, int64_t rows, int dim, float norm_scale, const ReduceWorkspace& ws,
                     cudaStream_t stream);

// U-Net skip: out = x + w⊙s, or with a gate lerp(w⊙s, x, σ(gate)) = w⊙s + σ⊙(x − w⊙s).
void skip_forward(const __nv_bfloat16* x, const __nv_bfloat16* s, const float* w, const float* gate,
                  __nv_bfloat16* out, int64_t rows, int dim, cudaStream_t stream);

// g: d out on entry, d x on return (σ⊙g, unchanged without a gate); ds = (1−σ)⊙w⊙g is written (fp32);
// dw += (1−σ)⊙Σ g⊙s; dgate += σ(1−σ)⊙Σ g⊙(x − w⊙s).
void skip_backward(float* g, const __nv_bfloat16* x, const __nv_bfloat16* s, const float* w, const float* gate,
                   float* ds, float* dw, float* dgate, int64_t rows, int dim, const ReduceWorkspace& ws,
                   cudaStream_t stream);

// Parallel residual lanes (s1560) with the branch scales folded in: a_s = attn_scale⊙a, f_s = mlp_scale⊙f,
//   out0 = r0·lane0 + p00·a_s + p10·f_s,   out1 = r1·lane1 + p01·a_s + p11·f_s   (resid [2], post [4]).
void lanes_forward(const __nv_bfloat16* lane0, const __nv_bfloat16* lane1, const __nv_bfloat16* a,
                   const __nv_bfloat16* f, const float* attn_scale, const float* mlp_scale, const float* resid,
                   const float* post, __nv_bfloat16* out0, __nv_bfloat16* out1, int64_t rows, int dim,
                   cudaStream_t stream);

// g0, g1: d out0, d out1 on entry, d lane0 = r0·g0 and d lane1 = r1·g1 on return. With
// da_s = p00·g0 + p01·g1 and df_s = p10·g0 + p11·g1: da = attn_scale⊙da_s, df = mlp_scale⊙df_s (bf16);
// dattn_scale += Σ da_s⊙a, dmlp_scale += Σ df_s⊙f, dresid += [Σ g0⊙lane0, Σ g1⊙lane1],
// dpost += [Σ g0⊙a_s, Σ g1⊙a_s, Σ g0⊙f_s, Σ g1⊙f_s].
void lanes_backward(float* g0, float* g1, const __nv_bfloat16* lane0, const __nv_bfloat16* lane1,
                    const __nv_bfloat16* a, const __nv_bfloat16* f, const float* attn_scale, const float* mlp_scale,
                    const float* resid, const float* post, __nv_bfloat16* da, __nv_bfloat16* df, float* dattn_scale,
                    float* dmlp_scale, float* dresid, float* dpost, int64_t rows, int dim, const ReduceWorkspace& ws,
                    cudaStream_t stream);

// Process-wide: the row kernels with many per-feature vectors (mix_norm_forward with the residual updates
// below, mix_norm_backward, skip_backward) keep their parameters and column sums in shared memory instead of
// registers, so that more rows are in flight (on by default; the same bits either way).
void set_row_staging(bool on);
bool row_staging();

// Workspace floats the backward ops above need for `rows` rows of `dim` features.
size_t residual_workspace_floats(int64_t rows, int dim);

}  // namespace pgolf::cuda
