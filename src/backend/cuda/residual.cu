// Row kernels of the residual stream: one warp per token row, lane l owning the 8-feature vectors
// l, l + 32, ... (kernel_util.cuh); per-feature parameters are read once per thread.
#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/residual.h"

#include <atomic>

namespace pgolf::cuda {
namespace {

#define PG_ROWS_OF_WARP(r, rows)                                                                          \
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); r < (rows); \
       r += static_cast<int64_t>(gridDim.x) * kRowWarps)
#define PG_LANE_VECS(k, f0, dim)          \
  _Pragma("unroll") for (int k = 0; k < kVec; ++k) \
    if (const int f0 = (lane + 32 * k) * 8; f0 < (dim))

// A per-feature parameter vector for the lane's features (fill where absent), read element by element:
// parameter tensors start at arbitrary offsets of the fp32 layout (no 16-byte alignment).
template <int kVec>
__device__ __forceinline__ void lane_params(const float* p, int dim, int lane, float fill, float (&out)[kVec][8]) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int f0 = (lane + 32 * k) * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) out[k][e] = (p && f0 < dim) ? p[f0 + e] : fill;
  }
}

// Sum of squares of the row's values across the warp → 1/sqrt(mean + eps).
template <int kVec>
__device__ __forceinline__ float row_rstd(const float (&v)[kVec][8], int dim, int lane) {
  float ss = 0.f;
  PG_LANE_VECS(k, f0, dim) {
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += v[k][e] * v[k][e];
  }
  return 1.f / sqrtf(warp_sum(ss) / static_cast<float>(dim) + kRmsNormEpsF);
}

// RMSNorm backward term of one row: scale·rstd·(dy − u·rstd²·(dy·u)/dim), into out (added).
template <int kVec>
__device__ __forceinline__ void add_norm_backward(const float (&dy)[kVec][8], const float (&u)[kVec][8], float inv,
                                                  float scale, int dim, int lane, float (&out)[kVec][8]) {
  float dot = 0.f;
  PG_LANE_VECS(k, f0, dim) {
#pragma unroll
    for (int e = 0; e < 8; ++e) dot += dy[k][e] * u[k][e];
  }
  dot = warp_sum(dot);
  const float c = inv * inv * dot / static_cast<float>(dim), coef = scale * inv;
  PG_LANE_VECS(k, f0, dim) {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[k][e] += coef * (dy[k][e] - u[k][e] * c);
  }
}

template <int kVec>
__device__ __forceinline__ void scaled_copy(const float (&a)[kVec][8], const float (&s)[kVec][8],
                                            float (&out)[kVec][8]) {
#pragma unroll
  for (int k = 0; k < kVec; ++k)
#pragma unroll
    for (int e = 0; e < 8; ++e) out[k][e] = a[k][e] * s[k][e];
}

// ---- per-feature vectors in registers or in shared memory -------------------------------------------
// A row kernel keeps, per lane, kVec vectors of 8 features of each per-feature parameter and of each column
// sum it accumulates over its rows. In registers they crowd out the rows in flight (mix_norm_backward held
// 200 registers a thread: one block per multiprocessor); staged (set_row_staging) they live in shared
// memory: parameters once per block, column sums once per warp, in slots of float4 pairs laid out
// [k][half][lane] (16-byte accesses without bank conflicts). The arithmetic is the same either way.
template <int kVec>
constexpr int kSlotFloat4s = kVec * 2 * 32;

constexpr int kMixNormPartials = 6;  // mix_norm_backward's partial-sum rows: dim-wide columns per block

template <int kVec, bool kStaged>
struct LaneVecs;

template <int kVec>
struct LaneVecs<kVec, false> {
  float v[kVec][8];
  __device__ __forceinline__ void get(int k, float (&o)[8]) const {
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = v[k][e];
  }
  __device__ __forceinline__ void put(int k, const float (&o)[8]) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[k][e] = o[e];
  }
};

template <int kVec>
struct LaneVecs<kVec, true> {
  float4* p;  // the slot's entry of this lane
  __device__ __forceinline__ void get(int k, float (&o)[8]) const {
    const float4 a = p[(2 * k) * 32], b = p[(2 * k + 1) * 32];
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
  }
  __device__ __forceinline__ void put(int k, const float (&o)[8]) {
    p[(2 * k) * 32] = make_float4(o[0], o[1], o[2], o[3]);
    p[(2 * k + 1) * 32] = make_float4(o[4], o[5], o[6], o[7]);
  }
};

// Per-feature values value(f) for f < dim (fill beyond) as LaneVecs: in registers, each thread its own, or
// in shared-memory slot `slot`, written by the whole block (every thread must call it; the caller
// synchronises the block before the first read).
template <int kVec, bool kStaged, typename F>
__device__ __forceinline__ LaneVecs<kVec, kStaged> param_vecs(float4* slots, int slot, int dim, float fill, F value) {
  const int lane = threadIdx.x & 31;
  if constexpr (kStaged) {
    float4* base = slots + slot * kSlotFloat4s<kVec>;
    for (int i = static_cast<int>(threadIdx.x); i < kSlotFloat4s<kVec>; i += static_cast<int>(blockDim.x)) {
      const int f0 = ((i & 31) + 32 * (i >> 6)) * 8 + 4 * ((i >> 5) & 1);  // i = (2k + half)·32 + lane
      float v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = f0 + e < dim ? value(f0 + e) : fill;
      base[i] = make_float4(v[0], v[1], v[2], v[3]);
    }
    return LaneVecs<kVec, true>{base + lane};
  } else {
    LaneVecs<kVec, false> r;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int f0 = (lane + 32 * k) * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) r.v[k][e] = f0 < dim ? value(f0 + e) : fill;
    }
    return r;
  }
}

// Zeroed column sums: in registers, or in this warp's slot `slot` (slots numbered per warp from `first`).
template <int kVec, bool kStaged>
__device__ __forceinline__ LaneVecs<kVec, kStaged> zero_vecs(float4* slots, int first, int per_warp, int slot) {
  LaneVecs<kVec, kStaged> r;
  if constexpr (kStaged) r.p = slots + (first + (threadIdx.x >> 5) * per_warp + slot) * kSlotFloat4s<kVec> + (threadIdx.x & 31);
  const float z[8] = {};
#pragma unroll
  for (int k = 0; k < kVec; ++k) r.put(k, z);
  return r;
}

template <int kVec, bool kStaged>
__device__ __forceinline__ void vecs_to_registers(const LaneVecs<kVec, kStaged>& v, float (&o)[kVec][8]) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) v.get(k, o[k]);
}

// Where store_column_partials puts its kRowWarps·dim floats once every warp holds its column sums in
// registers again: staged, the column-sum slots after the `params` parameter slots (the block synchronises
// first: other warps may still be reading theirs); else the start of the dynamic shared memory.
template <int kVec, bool kStaged>
__device__ __forceinline__ float* column_partials_smem(float4* slots, int params) {
  if constexpr (kStaged) {
    __syncthreads();
    return reinterpret_cast<float*>(slots + params * kSlotFloat4s<kVec>);
  }
  return reinterpret_cast<float*>(slots);
}

// Shared memory of a row kernel with `params` parameter slots, `per_warp` column-sum slots per warp and,
// when it stores column partials, the kRowWarps·dim floats of store_column_partials (the column-sum slots
// are reused for them once read back; staged only).
inline size_t staged_smem(int dim, int params, int per_warp, bool columns) {
  const size_t slot = static_cast<size_t>(dim <= 512 ? 2 : 4) * 2 * 32 * sizeof(float4);
  const size_t sums = static_cast<size_t>(kRowWarps) * per_warp * slot;
  const size_t column = columns ? static_cast<size_t>(kRowWarps) * dim * sizeof(float) : 0;
  return params * slot + (sums > column ? sums : column);
}

// coef = branch_scale⊙σ(gate) for the lane's features.
template <int kVec>
__device__ __forceinline__ void branch_coef(const float* scale, const float* gate, int dim, int lane,
                                            float (&coef)[kVec][8]) {
  lane_params<kVec>(scale, dim, lane, 0.f, coef);
  if (!gate) return;
  float g[kVec][8];
  lane_params<kVec>(gate, dim, lane, 0.f, g);
#pragma unroll
  for (int k = 0; k < kVec; ++k)
#pragma unroll
    for (int e = 0; e < 8; ++e) coef[k][e] *= sigmoidf_(g[k][e]);
}

// The block's partial sums of a branch's parameter gradients into row [2, dim] (the whole block calls it).
// Σ g⊙a is shared by both: dscale = σ·S, dgate = scale·σ(1−σ)·S (per-feature factors commute with the
// sum over rows, so they are applied to the block's partial sums).
template <int kVec>
__device__ __forceinline__ void store_branch_partials(const float (&acc)[kVec][8], const float* branch_scale,
                                                      const float* gate, bool want_dscale, bool want_dgate,
                                                      float* smem, float* row, int dim, int lane) {
  float s[kVec][8], sg[kVec][8], factor[kVec][8], p[kVec][8];
  lane_params<kVec>(gate, dim, lane, 0.f, sg);
  lane_params<kVec>(branch_scale, dim, lane, 0.f, s);
  if (want_dscale) {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
#pragma unroll
      for (int e = 0; e < 8; ++e) factor[k][e] = gate ? sigmoidf_(sg[k][e]) : 1.f;
    scaled_copy<kVec>(acc, factor, p);
    store_column_partials<kVec>(p, smem, row, dim);
  }
  if (want_dgate) {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float sig = sigmoidf_(sg[k][e]);
        factor[k][e] = s[k][e] * sig * (1.f - sig);
      }
    scaled_copy<kVec>(acc, factor, p);
    store_column_partials<kVec>(p, smem, row + dim, dim);
  }
}

// A branch added to the residual, x + coef·a, and the U-Net skip, x + w·s or lerp(w·s, x, σ), rounded to
// bf16 as stored: one definition, with every fp32 operation spelled out (no contraction left to the
// compiler), for the separate passes and the mix that folds them in, so that both give the same bits.
__device__ __forceinline__ float branch_value(float x, float coef, float a) { return round_bf16(__fmaf_rn(coef, a, x)); }
__device__ __forceinline__ float skip_value(float x, float s, float w, bool gated, float gate) {
  if (!gated) return round_bf16(__fmaf_rn(w, s, x));
  const float ws = __fmul_rn(w, s);
  return round_bf16(__fmaf_rn(sigmoidf_(gate), __fsub_rn(x, ws), ws));
}

// The U-Net skip's backward on one element, with every fp32 operation spelled out, shared by skip_backward
// and the mix that folds it in (the same bits): g = d out on entry, d x on return (σ⊙g, or g without a
// gate); ds = (1−σ)⊙w⊙g; the column sums Σ g⊙s (dw's) and, gated, Σ g⊙(x − w⊙s) (dgate's).
__device__ __forceinline__ void skip_element(float& g, float s, float x, float w, float sig, bool gated, float& ds,
                                             float& sum_w, float& sum_gate) {
  const float keep = gated ? __fsub_rn(1.f, sig) : 1.f;
  ds = __fmul_rn(__fmul_rn(keep, w), g);
  sum_w = __fmaf_rn(g, s, sum_w);
  if (gated) {
    sum_gate = __fmaf_rn(g, __fmaf_rn(-w, s, x), sum_gate);
    g = __fmul_rn(g, sig);
  }
}

// The block's partial sums of the skip's parameter gradients (the whole block calls it): dw = (1−σ)⊙Σ g⊙s
// into row_w, dgate = σ(1−σ)⊙Σ g⊙(x − w⊙s) into row_gate (null: skipped).
template <int kVec>
__device__ __forceinline__ void store_skip_partials(const float (&sum_w)[kVec][8], const float (&sum_gate)[kVec][8],
                                                    const float (&sig)[kVec][8], bool gated, float* smem,
                                                    float* row_w, float* row_gate, int dim) {
  float factor[kVec][8], p[kVec][8];
  if (row_w) {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
#pragma unroll
      for (int e = 0; e < 8; ++e) factor[k][e] = gated ? 1.f - sig[k][e] : 1.f;
    scaled_copy<kVec>(sum_w, factor, p);
    store_column_partials<kVec>(p, smem, row_w, dim);
  }
  if (gated && row_gate) {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
#pragma unroll
      for (int e = 0; e < 8; ++e) factor[k][e] = sig[k][e] * (1.f - sig[k][e]);
    scaled_copy<kVec>(sum_gate, factor, p);
    store_column_partials<kVec>(p, smem, row_gate, dim);
  }
}

// ---- resid_mix + RMSNorm -----------------------------------------------------------------------

// x_in = m0·x + m1·x0 rounded to bf16 as stored, with every fp32 operation rounded on its own (no
// fused multiply-add): the backward recomputes it from x and x0 and must see the forward's bits.
__device__ __forceinline__ float mixed_input(float m0, float x, float m1, float x0) {
  return round_bf16(__fadd_rn(__fmul_rn(m0, x), __fmul_rn(m1, x0)));
}

// kBelow: x from the residual updates of ResidualBelow (x is not read). Staged: 5 parameter slots.
template <int kVec, bool kBelow, bool kStaged>
__global__ void __launch_bounds__(kRowThreads, kStaged && kVec == 2 ? 4 : 1) mix_norm_forward_kernel(
    const bf16* __restrict__ x, const bf16* __restrict__ x0, const float* __restrict__ mix, bf16* __restrict__ x_in,
    bf16* __restrict__ n, float* __restrict__ rstd, int64_t rows, int dim, float scale, const ResidualBelow below) {
  pdl_prologue();
  extern __shared__ float4 slots[];
  const int lane = threadIdx.x & 31;
  const auto m0 = param_vecs<kVec, kStaged>(slots, 0, dim, 0.f, [&](int f) { return mix[f]; });
  const auto m1 = param_vecs<kVec, kStaged>(slots, 1, dim, 0.f, [&](int f) { return mix[dim + f]; });
  const bool skip = kBelow && below.s != nullptr, skip_gated = skip && below.skip_gate != nullptr;
  LaneVecs<kVec, kStaged> coef{}, wv{}, gv{};
  if constexpr (kBelow) {
    coef = param_vecs<kVec, kStaged>(slots, 2, dim, 0.f, [&](int f) {
      return below.gate ? below.branch_scale[f] * sigmoidf_(below.gate[f]) : below.branch_scale[f];
    });
    wv = param_vecs<kVec, kStaged>(slots, 3, dim, 0.f, [&](int f) { return skip ? below.w[f] : 0.f; });
    gv = param_vecs<kVec, kStaged>(slots, 4, dim, 0.f, [&](int f) { return skip_gated ? below.skip_gate[f] : 0.f; });
  }
  if constexpr (kStaged) __syncthreads();
  PG_ROWS_OF_WARP(r, rows) {
    float u[kVec][8];
    PG_LANE_VECS(k, f0, dim) {
      float a[8], b[8], p0[8], p1[8];
      if constexpr (kBelow) {
        float xm[8], av[8], c[8];
        load8(below.x_mid + r * dim + f0, xm);
        load8(below.a + r * dim + f0, av);
        coef.get(k, c);
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] = branch_value(xm[e], c[e], av[e]);
        if (below.out) store8(below.out + r * dim + f0, a);
        if (skip) {
          float sv[8], w[8], g[8];
          load8(below.s + r * dim + f0, sv);
          wv.get(k, w);
          gv.get(k, g);
#pragma unroll
          for (int e = 0; e < 8; ++e) a[e] = skip_value(a[e], sv[e], w[e], skip_gated, g[e]);
          if (below.in) store8(below.in + r * dim + f0, a);
        }
      } else {
        load8(x + r * dim + f0, a);
      }
      load8(x0 + r * dim + f0, b);
      m0.get(k, p0);
      m1.get(k, p1);
      // The stored (bf16) x_in is what the norm and its backward see.
#pragma unroll
      for (int e = 0; e < 8; ++e) u[k][e] = mixed_input(p0[e], a[e], p1[e], b[e]);
      store8(x_in + r * dim + f0, u[k]);
    }
    const float inv = row_rstd<kVec>(u, dim, lane);
    if (lane == 0) rstd[r] = inv;
    PG_LANE_VECS(k, f0, dim) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = (u[k][e] * inv) * scale;
      store8(n + r * dim + f0, o);
    }
  }
}

// Shared-memory slots of the staged mix_norm_backward: parameters (mix 0, mix 1, the branch coefficient, the
// skip's weight and σ), then per warp the column sums (Σ t⊙x, Σ t⊙x0, Σ o⊙a of the branch, the skip's two).
constexpr int mix_norm_backward_slots(int skip) { return skip ? 5 : 3; }

// kBelow: the MLP-branch backward of the layer below, on dx as written (BranchBelow). kSkip: the backward of
// the U-Net skip that feeds this layer, on dx as formed (SkipBelow): 0 none, 1 plain, 2 gated.
template <int kVec, bool kBelow, int kSkip, typename DnT, bool kStaged>
__global__ void __launch_bounds__(kRowThreads, kStaged && kVec == 2 ? 2 : 1) mix_norm_backward_kernel(
    const DnT* __restrict__ dn, const float* g_in, const float* __restrict__ rstd, const bf16* __restrict__ x,
    const bf16* __restrict__ x0, const float* __restrict__ mix, float* dx, bool accumulate_dx, float* __restrict__ dx0,
    const Dx0Pass dx0_pass, float* __restrict__ partials, const BranchBelow below, const SkipBelow skip, int64_t rows,
    int dim, float scale) {
  pdl_prologue();
  extern __shared__ float4 slots[];
  const int lane = threadIdx.x & 31;
  constexpr int kSlots = mix_norm_backward_slots(kSkip);
  const auto m0 = param_vecs<kVec, kStaged>(slots, 0, dim, 0.f, [&](int f) { return mix[f]; });
  const auto m1 = param_vecs<kVec, kStaged>(slots, 1, dim, 0.f, [&](int f) { return mix[dim + f]; });
  LaneVecs<kVec, kStaged> coef{}, skip_w{};
  if constexpr (kBelow)
    coef = param_vecs<kVec, kStaged>(slots, 2, dim, 0.f, [&](int f) {
      return below.gate ? below.branch_scale[f] * sigmoidf_(below.gate[f]) : below.branch_scale[f];
    });
  LaneVecs<kVec, kStaged> skip_sig{};
  constexpr bool skip_gated = kSkip == 2;
  if constexpr (kSkip) {
    skip_w = param_vecs<kVec, kStaged>(slots, 3, dim, 0.f, [&](int f) { return skip.w[f]; });
    skip_sig = param_vecs<kVec, kStaged>(slots, 4, dim, 1.f,
                                         [&](int f) { return skip.gate ? sigmoidf_(skip.gate[f]) : 1.f; });
  }
  auto acc0 = zero_vecs<kVec, kStaged>(slots, kSlots, kSlots, 0), acc1 = zero_vecs<kVec, kStaged>(slots, kSlots, kSlots, 1);
  auto acc_a = zero_vecs<kVec, kStaged>(slots, kSlots, kSlots, 2);
  LaneVecs<kVec, kStaged> acc_s{}, acc_sg{};
  if constexpr (kSkip) {
    acc_s = zero_vecs<kVec, kStaged>(slots, kSlots, kSlots, 3);
    acc_sg = zero_vecs<kVec, kStaged>(slots, kSlots, kSlots, 4);
  }
  if constexpr (kStaged) __syncthreads();
  PG_ROWS_OF_WARP(r, rows) {
    float d[kVec][8], u[kVec][8], t[kVec][8];
    PG_LANE_VECS(k, f0, dim) {
      // x_in recomputed from x and x0 instead of read back: x and x0 are read below anyway (their
      // second read hits the cache), so the row costs 2 bytes per feature less from memory.
      float a[8], b[8], p0[8], p1[8];
      load8(x + r * dim + f0, a);
      load8(x0 + r * dim + f0, b);
      m0.get(k, p0);
      m1.get(k, p1);
#pragma unroll
      for (int e = 0; e < 8; ++e) u[k][e] = mixed_input(p0[e], a[e], p1[e], b[e]);
      load8(dn + r * dim + f0, d[k]);
      if (g_in) load8(g_in + r * dim + f0, t[k]);
      else
#pragma unroll
        for (int e = 0; e < 8; ++e) t[k][e] = 0.f;
    }
    add_norm_backward<kVec>(d, u, rstd[r], scale, dim, lane, t);
    PG_LANE_VECS(k, f0, dim) {
      float a[8], b[8], o[8], p0[8], s0[8], s1[8];
      load8(x + r * dim + f0, a);
      load8(x0 + r * dim + f0, b);
      if (accumulate_dx) load8(dx + r * dim + f0, o);
      m0.get(k, p0);
      acc0.get(k, s0);
      acc1.get(k, s1);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        o[e] = (accumulate_dx ? o[e] : 0.f) + p0[e] * t[k][e];
        s0[e] += t[k][e] * a[e];
        s1[e] += t[k][e] * b[e];
      }
      acc0.put(k, s0);
      acc1.put(k, s1);
      if (dx0) {  // dx0 (+)= mix[1]⊙t here, before the passes below: fewer registers live across them
        float o0[8] = {}, p1[8];
        if (!dx0_pass.fresh) load8(dx0 + r * dim + f0, o0);  // fresh: 0 + mix[1]⊙t, as after a clearing pass
        m1.get(k, p1);
#pragma unroll
        for (int e = 0; e < 8; ++e) o0[e] += p1[e] * t[k][e];
        if constexpr (!kBelow && !kSkip) {
          if (dx0_pass.takes_dx) {  // (only here: refused with a branch or skip below)
#pragma unroll
            for (int e = 0; e < 8; ++e) o0[e] += o[e];  // add_f32(dx0, dx)'s addition
          }
        }
        store8(dx0 + r * dim + f0, o0);
      }
      if constexpr (kBelow) {
        // branch_backward's first pass, on the gradient just formed (the same fp32 operations).
        float av[8], da[8], c[8], sa[8];
        if (below.g_add) {
          float extra[8];
          load8(below.g_add + r * dim + f0, extra);
#pragma unroll
          for (int e = 0; e < 8; ++e) o[e] += extra[e];
        }
        load8(below.a + r * dim + f0, av);
        coef.get(k, c);
        acc_a.get(k, sa);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          da[e] = c[e] * o[e];
          sa[e] += o[e] * av[e];
        }
        acc_a.put(k, sa);
        store8(below.da + r * dim + f0, da);
      }
      if constexpr (kSkip) {
        // skip_backward on the gradient just formed (skip_element: the same fp32 operations); dx gets d x.
        float sv[8], xv[8] = {}, wk[8], sk[8], ss[8], sg[8], dsv[8];
        load8(skip.s + r * dim + f0, sv);
        if (skip_gated) load8(skip.x + r * dim + f0, xv);
        skip_w.get(k, wk);
        skip_sig.get(k, sk);
        acc_s.get(k, ss);
        if (skip_gated) acc_sg.get(k, sg);
#pragma unroll
        for (int e = 0; e < 8; ++e) skip_element(o[e], sv[e], xv[e], wk[e], sk[e], skip_gated, dsv[e], ss[e], sg[e]);
        acc_s.put(k, ss);
        if (skip_gated) acc_sg.put(k, sg);
        store8(skip.ds + r * dim + f0, dsv);
      }
      if (kBelow || kSkip || !dx0_pass.takes_dx) store8(dx + r * dim + f0, o);
    }
  }
  if (!partials) return;
  float s0[kVec][8], s1[kVec][8], sa[kVec][8], sk[kVec][8], sg[kVec][8], sig[kVec][8];
  vecs_to_registers(acc0, s0);
  vecs_to_registers(acc1, s1);
  vecs_to_registers(acc_a, sa);
  if constexpr (kSkip) {
    vecs_to_registers(acc_s, sk);
    vecs_to_registers(acc_sg, sg);
    vecs_to_registers(skip_sig, sig);
  }
  float* smem = column_partials_smem<kVec, kStaged>(slots, kSlots);
  // [dmix 2·dim | dscale, dgate below | dw, dgate of the skip]
  float* out = partials + static_cast<size_t>(blockIdx.x) * kMixNormPartials * dim;
  store_column_partials<kVec>(s0, smem, out, dim);
  store_column_partials<kVec>(s1, smem, out + dim, dim);
  if constexpr (kBelow)
    store_branch_partials<kVec>(sa, below.branch_scale, below.gate, below.dscale != nullptr,
                                below.dgate != nullptr && below.gate != nullptr, smem, out + 2 * dim, dim, lane);
  if constexpr (kSkip)
    store_skip_partials<kVec>(sk, sg, sig, skip_gated, smem, skip.dw ? out + 4 * dim : nullptr,
                              skip.dgate ? out + 5 * dim : nullptr, dim);
}

// ---- residual branch (+ RMSNorm) ---------------------------------------------------------------

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) branch_forward_kernel(const bf16* __restrict__ x,
                                                                     const bf16* __restrict__ a,
                                                                     const float* __restrict__ branch_scale,
                                                                     const float* __restrict__ gate,
                                                                     bf16* __restrict__ out, bf16* __restrict__ n,
                                                                     float* __restrict__ rstd, int64_t rows, int dim,
                                                                     float norm_scale) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  float coef[kVec][8];
  branch_coef<kVec>(branch_scale, gate, dim, lane, coef);
  PG_ROWS_OF_WARP(r, rows) {
    float u[kVec][8];
    PG_LANE_VECS(k, f0, dim) {
      float av[8], xv[8] = {};
      load8(a + r * dim + f0, av);
      if (x) load8(x + r * dim + f0, xv);
#pragma unroll
      for (int e = 0; e < 8; ++e) u[k][e] = branch_value(xv[e], coef[k][e], av[e]);
      store8(out + r * dim + f0, u[k]);
    }
    if (!n) continue;
    const float inv = row_rstd<kVec>(u, dim, lane);
    if (lane == 0) rstd[r] = inv;
    PG_LANE_VECS(k, f0, dim) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = (u[k][e] * inv) * norm_scale;
      store8(n + r * dim + f0, o);
    }
  }
}

template <int kVec, typename DnT>
__global__ void __launch_bounds__(kRowThreads) branch_backward_kernel(
    const DnT* __restrict__ dn, float* __restrict__ g, const float* __restrict__ g_add, const bf16* __restrict__ out,
    const float* __restrict__ rstd, const bf16* __restrict__ a, const float* __restrict__ branch_scale,
    const float* __restrict__ gate, bf16* __restrict__ da, float* __restrict__ partials, bool want_dscale,
    bool want_dgate, int64_t rows, int dim, float norm_scale) {
  pdl_prologue();
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  float coef[kVec][8], acc[kVec][8] = {};
  branch_coef<kVec>(branch_scale, gate, dim, lane, coef);
  PG_ROWS_OF_WARP(r, rows) {
    float t[kVec][8];
    PG_LANE_VECS(k, f0, dim) {
      load8(g + r * dim + f0, t[k]);
      if (g_add) {
        float extra[8];
        load8(g_add + r * dim + f0, extra);
#pragma unroll
        for (int e = 0; e < 8; ++e) t[k][e] += extra[e];
      }
    }
    if (dn) {
      float d[kVec][8], u[kVec][8];
      PG_LANE_VECS(k, f0, dim) {
        load8(dn + r * dim + f0, d[k]);
        load8(out + r * dim + f0, u[k]);
      }
      add_norm_backward<kVec>(d, u, rstd[r], norm_scale, dim, lane, t);
    }
    if (dn || g_add) {
      PG_LANE_VECS(k, f0, dim) { store8(g + r * dim + f0, t[k]); }
    }
    PG_LANE_VECS(k, f0, dim) {
      float av[8], o[8];
      load8(a + r * dim + f0, av);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        o[e] = coef[k][e] * t[k][e];
        acc[k][e] += t[k][e] * av[e];
      }
      store8(da + r * dim + f0, o);
    }
  }
  if (partials)
    store_branch_partials<kVec>(acc, branch_scale, gate, want_dscale, want_dgate, smem,
                                partials + static_cast<size_t>(blockIdx.x) * 2 * dim, dim, lane);
}

// ---- U-Net skip ------------------------------------------------------------------------------------

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) skip_forward_kernel(const bf16* __restrict__ x,
                                                                   const bf16* __restrict__ s,
                                                                   const float* __restrict__ w,
                                                                   const float* __restrict__ gate,
                                                                   bf16* __restrict__ out, int64_t rows, int dim) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  float wv[kVec][8], gv[kVec][8];
  lane_params<kVec>(w, dim, lane, 0.f, wv);
  lane_params<kVec>(gate, dim, lane, 0.f, gv);
  PG_ROWS_OF_WARP(r, rows) {
    PG_LANE_VECS(k, f0, dim) {
      float xv[8], sv[8], o[8];
      load8(x + r * dim + f0, xv);
      load8(s + r * dim + f0, sv);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = skip_value(xv[e], sv[e], wv[k][e], gate != nullptr, gv[k][e]);
      store8(out + r * dim + f0, o);
    }
  }
}

// Staged: 2 parameter slots, then 2 column-sum slots per warp.
template <int kVec, bool kStaged>
__global__ void __launch_bounds__(kRowThreads, kStaged && kVec == 2 ? 4 : 1) skip_backward_kernel(
    float* __restrict__ g, const bf16* __restrict__ x, const bf16* __restrict__ s, const float* __restrict__ w,
    const float* __restrict__ gate, float* __restrict__ ds, float* __restrict__ partials, bool want_dw,
    bool want_dgate, int64_t rows, int dim) {
  pdl_prologue();
  extern __shared__ float4 slots[];
  const int lane = threadIdx.x & 31;
  const auto wv = param_vecs<kVec, kStaged>(slots, 0, dim, 0.f, [&](int f) { return w ? w[f] : 0.f; });
  const auto sig = param_vecs<kVec, kStaged>(slots, 1, dim, 1.f, [&](int f) { return gate ? sigmoidf_(gate[f]) : 1.f; });
  auto acc_w = zero_vecs<kVec, kStaged>(slots, 2, 2, 0), acc_g = zero_vecs<kVec, kStaged>(slots, 2, 2, 1);
  if constexpr (kStaged) __syncthreads();
  PG_ROWS_OF_WARP(r, rows) {
    PG_LANE_VECS(k, f0, dim) {
      float gv[8], xv[8], sv[8], dsv[8], wk[8], sk[8], aw[8], ag[8];
      load8(g + r * dim + f0, gv);
      load8(s + r * dim + f0, sv);
      if (gate) load8(x + r * dim + f0, xv);
      wv.get(k, wk);
      sig.get(k, sk);
      acc_w.get(k, aw);
      if (gate) acc_g.get(k, ag);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        skip_element(gv[e], sv[e], gate ? xv[e] : 0.f, wk[e], sk[e], gate != nullptr, dsv[e], aw[e], ag[e]);
      acc_w.put(k, aw);
      if (gate) acc_g.put(k, ag);
      store8(ds + r * dim + f0, dsv);
      if (gate) store8(g + r * dim + f0, gv);
    }
  }
  if (!partials) return;
  float aw[kVec][8], ag[kVec][8], sk[kVec][8];
  vecs_to_registers(acc_w, aw);
  vecs_to_registers(acc_g, ag);
  vecs_to_registers(sig, sk);
  float* smem = column_partials_smem<kVec, kStaged>(slots, 2);
  float* row = partials + static_cast<size_t>(blockIdx.x) * 2 * dim;
  store_skip_partials<kVec>(aw, ag, sk, gate != nullptr, smem, want_dw ? row : nullptr, want_dgate ? row + dim : nullptr,
                            dim);
}

// ---- parallel lanes ------------------------------------------------------------------------------

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) lanes_forward_kernel(
    const bf16* __restrict__ lane0, const bf16* __restrict__ lane1, const bf16* __restrict__ a,
    const bf16* __restrict__ f, const float* __restrict__ attn_scale, const float* __restrict__ mlp_scale,
    const float* __restrict__ resid, const float* __restrict__ post, bf16* __restrict__ out0, bf16* __restrict__ out1,
    int64_t rows, int dim) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  float as[kVec][8], ms[kVec][8];
  lane_params<kVec>(attn_scale, dim, lane, 0.f, as);
  lane_params<kVec>(mlp_scale, dim, lane, 0.f, ms);
  const float r0 = resid[0], r1 = resid[1], p00 = post[0], p01 = post[1], p10 = post[2], p11 = post[3];
  PG_ROWS_OF_WARP(r, rows) {
    PG_LANE_VECS(k, f0, dim) {
      float l0[8], l1[8], av[8], fv[8];
      load8(lane0 + r * dim + f0, l0);
      load8(lane1 + r * dim + f0, l1);
      load8(a + r * dim + f0, av);
      load8(f + r * dim + f0, fv);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float a_s = as[k][e] * av[e], f_s = ms[k][e] * fv[e];
        l0[e] = r0 * l0[e] + p00 * a_s + p10 * f_s;
        l1[e] = r1 * l1[e] + p01 * a_s + p11 * f_s;
      }
      store8(out0 + r * dim + f0, l0);
      store8(out1 + r * dim + f0, l1);
    }
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) lanes_backward_kernel(
    float* __restrict__ g0, float* __restrict__ g1, const bf16* __restrict__ lane0, const bf16* __restrict__ lane1,
    const bf16* __restrict__ a, const bf16* __restrict__ f, const float* __restrict__ attn_scale,
    const float* __restrict__ mlp_scale, const float* __restrict__ resid, const float* __restrict__ post,
    bf16* __restrict__ da, bf16* __restrict__ df, float* __restrict__ partials, int64_t rows, int dim) {
  pdl_prologue();
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  float as[kVec][8], ms[kVec][8], acc_a[kVec][8] = {}, acc_f[kVec][8] = {};
  lane_params<kVec>(attn_scale, dim, lane, 0.f, as);
  lane_params<kVec>(mlp_scale, dim, lane, 0.f, ms);
  const float r0 = resid[0], r1 = resid[1], p00 = post[0], p01 = post[1], p10 = post[2], p11 = post[3];
  float sums[6] = {};  // Σ g0⊙lane0, Σ g1⊙lane1, Σ g0⊙a_s, Σ g1⊙a_s, Σ g0⊙f_s, Σ g1⊙f_s
  PG_ROWS_OF_WARP(r, rows) {
    PG_LANE_VECS(k, f0, dim) {
      float d0[8], d1[8], l0[8], l1[8], av[8], fv[8], dav[8], dfv[8];
      load8(g0 + r * dim + f0, d0);
      load8(g1 + r * dim + f0, d1);
      load8(lane0 + r * dim + f0, l0);
      load8(lane1 + r * dim + f0, l1);
      load8(a + r * dim + f0, av);
      load8(f + r * dim + f0, fv);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float a_s = as[k][e] * av[e], f_s = ms[k][e] * fv[e];
        const float da_s = p00 * d0[e] + p01 * d1[e], df_s = p10 * d0[e] + p11 * d1[e];
        sums[0] += d0[e] * l0[e];
        sums[1] += d1[e] * l1[e];
        sums[2] += d0[e] * a_s;
        sums[3] += d1[e] * a_s;
        sums[4] += d0[e] * f_s;
        sums[5] += d1[e] * f_s;
        acc_a[k][e] += da_s * av[e];
        acc_f[k][e] += df_s * fv[e];
        dav[e] = as[k][e] * da_s;
        dfv[e] = ms[k][e] * df_s;
        d0[e] *= r0;
        d1[e] *= r1;
      }
      store8(g0 + r * dim + f0, d0);
      store8(g1 + r * dim + f0, d1);
      store8(da + r * dim + f0, dav);
      store8(df + r * dim + f0, dfv);
    }
  }
  if (!partials) return;
  float* row = partials + static_cast<size_t>(blockIdx.x) * (2 * dim + 6);
  store_column_partials<kVec>(acc_a, smem, row, dim);
  store_column_partials<kVec>(acc_f, smem, row + dim, dim);
  for (int i = 0; i < 6; ++i) store_scalar_partial(sums[i], smem, row + 2 * dim + i);
}

size_t column_smem(int dim) { return static_cast<size_t>(kRowWarps) * dim * sizeof(float); }

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

template <typename F>
void dispatch_skip(const SkipBelow* skip, F&& f) {
  if (!skip) f(std::integral_constant<int, 0>{});
  else if (!skip->gate) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

std::atomic<bool>& staging() {
  static std::atomic<bool> on{true};
  return on;
}

// Raises the kernel's dynamic shared-memory limit, once, to what it needs for the largest rows of its kVec.
template <auto kKernel>
void allow_staged_smem(size_t max_bytes) {
  static const bool done = [max_bytes] {
    if (max_bytes > 48 * 1024)
      PG_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_bytes)));
    return true;
  }();
  (void)done;
}

}  // namespace

void set_row_staging(bool on) { staging().store(on); }
bool row_staging() { return staging().load(); }

size_t residual_workspace_floats(int64_t rows, int dim) {
  return static_cast<size_t>(row_blocks(rows)) * (kMixNormPartials * dim + 6);
}

void mix_norm_forward(const bf16* x, const bf16* x0, const float* mix, bf16* x_in, bf16* n, float* rstd, int64_t rows,
                      int dim, float scale, cudaStream_t stream, const ResidualBelow* below) {
  check_row_dim(dim, "mix_norm_forward");
  if (rows == 0) return;
  if (below) {
    PG_CUDA_REQUIRE(below->x_mid && below->a && below->branch_scale,
                    "mix_norm_forward: the branch below needs x_mid, a and branch_scale");
    PG_CUDA_REQUIRE(!below->s || below->w, "mix_norm_forward: the skip below needs w");
  } else {
    PG_CUDA_REQUIRE(x != nullptr, "mix_norm_forward: x is null");
  }
  const bool staged = row_staging();
  dispatch_row_vec(dim, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    auto launch = [&](auto below_tag, auto staged_tag) {
      constexpr bool kBelow = decltype(below_tag)::value, kStaged = decltype(staged_tag)::value;
      constexpr auto kernel = mix_norm_forward_kernel<kVec, kBelow, kStaged>;
      const size_t smem = kStaged ? staged_smem(dim, 5, 0, false) : 0;
      if constexpr (kStaged) allow_staged_smem<kernel>(staged_smem(kVec * 256, 5, 0, false));
      launch_kernel(kernel, row_blocks(rows), kRowThreads, smem, stream, x, x0, mix, x_in, n, rstd, rows, dim, scale,
                    below ? *below : ResidualBelow{});
    };
    dispatch_bool(below != nullptr, [&](auto below_tag) {
      dispatch_bool(staged, [&](auto staged_tag) { launch(below_tag, staged_tag); });
    });
  });
  PG_CUDA_LAUNCH_CHECK();
}

void mix_norm_backward(NormGrad dn, const float* g_in, const float* rstd, const bf16* x, const bf16* x0,
                       const float* mix, float* dx, bool accumulate_dx, float* dx0, float* dmix, int64_t rows, int dim,
                       float scale, const ReduceWorkspace& ws, cudaStream_t stream, const BranchBelow* below,
                       const SkipBelow* skip, Dx0Pass dx0_pass) {
  check_row_dim(dim, "mix_norm_backward");
  if (rows == 0) return;
  PG_CUDA_REQUIRE(dx0 || !dx0_pass.takes_dx, "mix_norm_backward: dx can only be added into a given dx0");
  PG_CUDA_REQUIRE(!dx0_pass.takes_dx || (!below && !skip),
                  "mix_norm_backward: dx goes into dx0 only without a branch or skip below (layer 0 has neither)");
  PG_CUDA_REQUIRE(!below || (below->a && below->da), "mix_norm_backward: the branch below needs a and da");
  PG_CUDA_REQUIRE(!skip || (skip->s && skip->w && skip->ds && (!skip->gate || skip->x)),
                  "mix_norm_backward: the skip needs s, w and ds, and x with a gate");
  PG_CUDA_REQUIRE(!skip || !below || (!below->g_add && !skip->gate),
                  "mix_norm_backward: the branch below with a skip gradient into it, or with a gated skip, cannot "
                  "take this layer's skip too");
  const int blocks = row_blocks(rows);
  const bool below_dgate = below && below->dgate && below->gate;
  const bool skip_dgate = skip && skip->gate && skip->dgate;
  const bool any = dmix || (below && (below->dscale || below_dgate)) || (skip && skip->dw) || skip_dgate;
  // Partials per block: [dmix 2·dim | dscale dim | dgate dim | the skip's dw dim | its dgate dim].
  if (any) check_reduce_workspace(ws, blocks, kMixNormPartials * dim, "mix_norm_backward");
  float* partials = any ? ws.data : nullptr;
  const bool staged = row_staging();
  dispatch_row_vec(dim, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    dispatch_norm_grad(dn, [&](auto dn_rows) {
      using DnT = std::remove_cv_t<std::remove_pointer_t<decltype(dn_rows)>>;
      dispatch_bool(below != nullptr, [&](auto below_tag) {
        dispatch_skip(skip, [&](auto skip_tag) {
          dispatch_bool(staged, [&](auto staged_tag) {
            constexpr bool kBelow = decltype(below_tag)::value;
            constexpr int kSkip = decltype(skip_tag)::value;
            constexpr bool kStaged = decltype(staged_tag)::value;
            if constexpr (!(kBelow && kSkip == 2)) {  // that pair is refused above
              constexpr auto kernel = mix_norm_backward_kernel<kVec, kBelow, kSkip, DnT, kStaged>;
              constexpr int n = mix_norm_backward_slots(kSkip);
              const size_t smem = kStaged ? staged_smem(dim, n, n, true) : column_smem(dim);
              if constexpr (kStaged) allow_staged_smem<kernel>(staged_smem(kVec * 256, n, n, true));
              launch_kernel(kernel, blocks, kRowThreads, smem, stream, dn_rows, g_in, rstd, x, x0, mix, dx,
                            accumulate_dx, dx0, dx0_pass, partials, below ? *below : BranchBelow{},
                            skip ? *skip : SkipBelow{}, rows, dim, scale);
            }
          });
        });
      });
    });
  });
  PG_CUDA_LAUNCH_CHECK();
  if (any)
    finish_partial_sums(ws.data, blocks,
                        {{dmix, 2 * dim},
                         {below ? below->dscale : nullptr, dim},
                         {below_dgate ? below->dgate : nullptr, dim},
                         {skip ? skip->dw : nullptr, dim},
                         {skip_dgate ? skip->dgate : nullptr, dim}},
                        stream);
}

void branch_forward(const bf16* x, const bf16* a, const float* branch_scale, const float* gate, bf16* out, bf16* n,
                    float* rstd, int64_t rows, int dim, float norm_scale, cudaStream_t stream) {
  check_row_dim(dim, "branch_forward");
  if (rows == 0) return;
  dispatch_row_vec(dim, [&](auto vec) {
    launch_kernel(branch_forward_kernel<decltype(vec)::value>, row_blocks(rows), kRowThreads, 0, stream, x, a,
                  branch_scale, gate, out, n, rstd, rows, dim, norm_scale);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void branch_backward(NormGrad dn, float* g, const float* g_add, const bf16* out, const float* rstd, const bf16* a,
                     const float* branch_scale, const float* gate, bf16* da, float* dscale, float* dgate, int64_t rows,
                     int dim, float norm_scale, const ReduceWorkspace& ws, cudaStream_t stream) {
  check_row_dim(dim, "branch_backward");
  if (rows == 0) return;
  const int blocks = row_blocks(rows);
  const bool want_dgate = dgate != nullptr && gate != nullptr;
  const bool any = dscale != nullptr || want_dgate;
  if (any) check_reduce_workspace(ws, blocks, 2 * dim, "branch_backward");
  float* partials = any ? ws.data : nullptr;
  dispatch_row_vec(dim, [&](auto vec) {
    dispatch_norm_grad(dn, [&](auto dn_rows) {
      using DnT = std::remove_cv_t<std::remove_pointer_t<decltype(dn_rows)>>;
      launch_kernel(branch_backward_kernel<decltype(vec)::value, DnT>, blocks, kRowThreads, column_smem(dim), stream,
                    dn_rows, g, g_add, out, rstd, a, branch_scale, gate, da, partials, dscale != nullptr, want_dgate,
                    rows, dim, norm_scale);
    });
  });
  PG_CUDA_LAUNCH_CHECK();
  if (any) finish_partial_sums(ws.data, blocks, {{dscale, dim}, {want_dgate ? dgate : nullptr, dim}}, stream);
}

void skip_forward(const bf16* x, const bf16* s, const float* w, const float* gate, bf16* out, int64_t rows, int dim,
                  cudaStream_t stream) {
  check_row_dim(dim, "skip_forward");
  if (rows == 0) return;
  dispatch_row_vec(dim, [&](auto vec) {
    launch_kernel(skip_forward_kernel<decltype(vec)::value>, row_blocks(rows), kRowThreads, 0, stream, x, s, w, gate,
                  out, rows, dim);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void skip_backward(float* g, const bf16* x, const bf16* s, const float* w, const float* gate, float* ds, float* dw,
                   float* dgate, int64_t rows, int dim, const ReduceWorkspace& ws, cudaStream_t stream) {
  check_row_dim(dim, "skip_backward");
  if (rows == 0) return;
  const int blocks = row_blocks(rows);
  const bool want_dgate = dgate != nullptr && gate != nullptr;
  const bool any = dw != nullptr || want_dgate;
  if (any) check_reduce_workspace(ws, blocks, 2 * dim, "skip_backward");
  float* partials = any ? ws.data : nullptr;
  const bool staged = row_staging();
  dispatch_row_vec(dim, [&](auto vec) {
    dispatch_bool(staged, [&](auto staged_tag) {
      constexpr int kVec = decltype(vec)::value;
      constexpr bool kStaged = decltype(staged_tag)::value;
      constexpr auto kernel = skip_backward_kernel<kVec, kStaged>;
      const size_t smem = kStaged ? staged_smem(dim, 2, 2, true) : column_smem(dim);
      if constexpr (kStaged) allow_staged_smem<kernel>(staged_smem(kVec * 256, 2, 2, true));
      launch_kernel(kernel, blocks, kRowThreads, smem, stream, g, x, s, w, gate, ds, partials, dw != nullptr,
                    want_dgate, rows, dim);
    });
  });
  PG_CUDA_LAUNCH_CHECK();
  if (any) finish_partial_sums(ws.data, blocks, {{dw, dim}, {want_dgate ? dgate : nullptr, dim}}, stream);
}

void lanes_forward(const bf16* lane0, const bf16* lane1, const bf16* a, const bf16* f, const float* attn_scale,
                   const float* mlp_scale, const float* resid, const float* post, bf16* out0, bf16* out1, int64_t rows,
                   int dim, cudaStream_t stream) {
  check_row_dim(dim, "lanes_forward");
  if (rows == 0) return;
  dispatch_row_vec(dim, [&](auto vec) {
    launch_kernel(lanes_forward_kernel<decltype(vec)::value>, row_blocks(rows), kRowThreads, 0, stream, lane0, lane1, a,
                  f, attn_scale, mlp_scale, resid, post, out0, out1, rows, dim);
  });
  PG_CUDA_LAUNCH_CHECK();
}

void lanes_backward(float* g0, float* g1, const bf16* lane0, const bf16* lane1, const bf16* a, const bf16* f,
                    const float* attn_scale, const float* mlp_scale, const float* resid, const float* post, bf16* da,
                    bf16* df, float* dattn_scale, float* dmlp_scale, float* dresid, float* dpost, int64_t rows,
                    int dim, const ReduceWorkspace& ws, cudaStream_t stream) {
  check_row_dim(dim, "lanes_backward");
  if (rows == 0) return;
  const int blocks = row_blocks(rows);
  const bool any = dattn_scale || dmlp_scale || dresid || dpost;
  if (any) check_reduce_workspace(ws, blocks, 2 * dim + 6, "lanes_backward");
  float* partials = any ? ws.data : nullptr;
  dispatch_row_vec(dim, [&](auto vec) {
    launch_kernel(lanes_backward_kernel<decltype(vec)::value>, blocks, kRowThreads, column_smem(dim), stream, g0, g1,
                  lane0, lane1, a, f, attn_scale, mlp_scale, resid, post, da, df, partials, rows, dim);
  });
  PG_CUDA_LAUNCH_CHECK();
  if (any)
    finish_partial_sums(ws.data, blocks, {{dattn_scale, dim}, {dmlp_scale, dim}, {dresid, 2}, {dpost, 4}}, stream);
}

}  // namespace pgolf::cuda
