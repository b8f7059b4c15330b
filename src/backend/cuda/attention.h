// Causal flash attention on tensor cores: bf16 q/k/v/o, fp32 softmax statistics, head dim 64,
// grouped-query heads, variable-length segments (FlashAttention's varlen layout), forward and
// backward. Scale 1/√64.
//
// Layouts (token-major, as everywhere in pgolf):
//   q, o, dq [N, H, 64]   k, v, dk, dv [N, Hkv, 64]   (bf16)
//   lse      [H, N]       natural-log sum of exp(scale · q·k) over the keys each query sees (fp32)
// Query head h reads KV head h / (H / Hkv). cu_seqlens (device, int32, num_segments + 1 entries)
// holds the segment starts and then N: cu[0] = 0, non-decreasing, cu[num_segments] = N. Each token
// attends to the tokens of its own segment at or before it. Empty segments are allowed (FlashAttention
// pads cu_seqlens with the total). B dense rows of length T are cu = [0, T, 2T, ..., BT].
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pgolf::cuda {

constexpr int kAttentionHeadDim = 64;

struct AttentionShape {
  int total_tokens = 0;  // N
  int num_heads = 0;     // H
  int num_kv_heads = 0;  // Hkv, divides H
  const int32_t* cu_seqlens = nullptr;  // device
  int num_segments = 0;
  // Forward only, optional (device, num_segments entries): per segment the first segment-local query
  // whose output is needed. Query tiles that end before it are skipped, their o and lse rows left
  // unwritten; every computed row attends to all its keys, as without it.
  const int32_t* query_begin = nullptr;
};

// Forward implementations: FlashAttention-2 on mma.sync (sm_80 instructions), or Hopper's warpgroup
// MMA (wgmma, needs an sm_90a build and an sm_90 GPU), either with every warp computing (operands
// copied by cp.async) or warp-specialized (wgmma_ws: a producer warpgroup streams K and V with TMA to
// two or three consumer warpgroups, FlashAttention-3's scheme). Same outputs up to accumulation order.
enum class AttentionForwardKernel { mma_sync, wgmma, wgmma_ws };

// Backward main kernels: mma.sync (16 keys per warp), or Hopper's wgmma (64 keys per warpgroup,
// sm_90a build and sm_90 GPU), either with every warp computing (operands copied by cp.async) or
// warp-specialized (wgmma_ws: a producer warpgroup streams the query tiles with TMA to three consumer
// warpgroups, which take turns computing a tile's dQ; 12 warps only). All add dQ with fp32 atomics;
// the deterministic dQ path (AttentionTuning::deterministic) always runs the mma.sync kernel for dK, dV.
enum class AttentionBackwardKernel { mma_sync, wgmma, wgmma_ws };

// Kernel shapes. The forward kernel gives each warp 16 query rows (a block has 16 · forward_warps;
// with wgmma each warpgroup of 4 warps owns 64 of them); the backward kernel gives each warp 16 keys
// (with wgmma each warpgroup 64). Both accept 4 or 8, the wgmma backward also 12 (three warpgroups,
// 192 keys a block) and the warp-specialized backward 12 only, as the warp-specialized forward (three
// warpgroups computing, plus a producer warpgroup). The defaults are the fastest measured on an H100 for the default kernels
// (bench_cuda compares them): the warp-specialized forward with 128-key tiles (dense T 2048: 0.64-0.65
// ms against 0.75 with 64); the wgmma forward with 8 warps and 64-key tiles (0.68 ms against 0.72 with
// 4 warps; set them with that kernel); the mma.sync forward with 4 warps (0.81 against 0.84); the
// mma.sync backward with 8 warps (2.60 ms against 2.64 with 4 at s691's shape; set it with that kernel,
// which has no 12), the wgmma one with 12 (1.86 ms against 2.18 with 4 and 2.02 with 8; set them with
// that kernel). The
// deterministic path runs the mma.sync kernel and needs 4 or 8.
struct AttentionTuning {
  int forward_warps = 12;
  int backward_warps = 12;
  // Backward: dQ from a separate pass that sums the key tiles in order (the same bits on every run)
  // instead of fp32 atomics from the key-tile blocks (whose order, and so whose last bits, vary).
  bool deterministic = false;
  // The Hopper wgmma forward takes 15-16 % less time than the mma.sync one on an H100
  // (docs/PERFORMANCE.md), the warp-specialized one 1-7 % less than that at s691's dense shape and
  // 1-4 % less on documents of random length, with the same results within the tests' bounds.
  AttentionForwardKernel forward_kernel = AttentionForwardKernel::wgmma_ws;
  // The wgmma backward (attention_backward_wgmma.cu) is 27-28 % faster than the mma.sync one on an
  // H100 (dense T 2048: 1.86 ms, 277 TFLOP/s against 2.60 ms, 198) within the same test bounds; the
  // warp-specialized one (attention_backward_ws.cu) 11 % faster than that (1.65 ms, 312 TFLOP/s; 9 %
  // on documents of random length; s691 77.6 against 80.2-80.5 ms a step), the same dK, dV.
  // Ignored when `deterministic` is set.
  AttentionBackwardKernel backward_kernel = AttentionBackwardKernel::wgmma_ws;
  // Keys per K/V tile of the wgmma forwards: 64 or 128 (the mma.sync forward always uses 64).
  int forward_key_tile = 128;
  // The warp-specialized forward runs one block per multiprocessor. A call with fewer of its blocks than
  // this many waves of the GPU's multiprocessors runs the wgmma forward (8 warps, 64-key tiles) instead:
  // few rows leave most of the GPU idle with its 192-query, two-head blocks (LoRA TTT's small calls:
  // 25.5 s with it against 24.9 s with the wgmma forward on the s1560 prefix). The choice depends on
  // the shape only, so every caller gets the same bits for the same shape. 0: never.
  double forward_ws_min_waves = 2.0;
};

void attention_forward(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, __nv_bfloat16* o, float* lse, cudaStream_t stream,
                       const AttentionTuning& tuning = {});

// Device scratch the backward needs (fp32 dq accumulator and the per-row D = rowsum(dO ∘ O)).
size_t attention_backward_workspace_bytes(const AttentionShape& shape);

// The rows of D = rowsum(dO ∘ O) in the backward's workspace, fp32 [heads][tokens] (D of head h and token
// i at h·total_tokens + i). A caller that holds dO and O already (XSA's backward, xsa.h) may write D there
// and pass delta_ready: the backward then reads it instead of computing it (its first pass only zeroes
// the dQ accumulator). D must be the bits the backward computes: per token and head, over 8 slices of 8
// features, s = fma(o[2j], d[2j], fma(o[2j+1], d[2j+1], s)) for j = 0..3 from 0, then the slices summed by
// xor-shuffles over 1, 2 and 4, on dO and O as stored (bf16).
float* attention_backward_delta(const AttentionShape& shape, void* workspace);

// dq, dk, dv from the forward's o and lse and the output gradient d_o. Every element of dq, dk and
// dv is written (no accumulation into them). dk and dv are deterministic; dq only with
// tuning.deterministic. delta_ready: D is in the workspace (attention_backward_delta).
void attention_backward(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse,
                        const __nv_bfloat16* d_o, __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream,
                        const AttentionTuning& tuning = {}, bool delta_ready = false);

// dQ before the backward's finish pass: dq = bf16(scale · sum) elementwise, sum [N, H, 64] fp32 (device).
struct DqSum {
  const float* sum = nullptr;
  float scale = 1.f;
};

// attention_backward without the dQ finish pass, for a consumer that rounds bf16(scale · sum) itself
// (qk_norm_rope_backward): the bf16 dq is neither written nor read back, and one launch less. dk and
// dv are written; dQ stays in the workspace (valid until the workspace is next used) and is returned.
// Not with tuning.deterministic, whose dQ pass writes bf16 directly.
DqSum attention_backward_unfinished(const AttentionShape& shape, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                    const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse,
                                    const __nv_bfloat16* d_o, __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream, const AttentionTuning& tuning = {},
                                    bool delta_ready = false);

}  // namespace pgolf::cuda
