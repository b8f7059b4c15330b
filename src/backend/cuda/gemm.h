// Matrix products on cuBLASLt with pgolf's row-major conventions: bf16 operands, fp32 accumulation,
// bf16 or fp32 output, optional strided batch, a fused bias epilogue, and a plan cache (layouts,
// descriptor and the heuristic's algorithm) keyed by everything that selects a kernel. A bf16 output is
// one rounding of its fp32 sum (split-K partial sums are reduced in fp32, never in bf16).
//
//   D[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * D[m, n]          (D is also C: in place)
//
// op(X) = X, or Xᵀ when the matching `trans_*` is set; every matrix is row-major and contiguous in
// its rows: A is stored [m, k] (or [k, m] transposed), B is stored [k, n] (or [n, k]), D is [m, n].
// The three products of a linear layer y = x Wᵀ (x [tokens, in], W [out, in]) are
//   forward          y  = x Wᵀ        A = x,   B = W  (trans_b)
//   input gradient   dx = dy W        A = dy,  B = W
//   weight gradient  dW += dyᵀ x      A = dy (trans_a), B = x, fp32 output, beta = 1 (accumulates
//                                     across micro-steps)
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

namespace pgolf::cuda {

enum class GemmOutput : uint8_t { kBf16, kF32 };
enum class GemmEpilogue : uint8_t {
  kNone,
  kBias,  // D[i, j] += bias[j]; bias has D's dtype and n entries
};

struct GemmShape {
  int m = 0, n = 0, k = 0;
  bool trans_a = false, trans_b = false;
  GemmOutput output = GemmOutput::kBf16;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  // Strided batch: matrix i of each operand starts stride_* elements after matrix i - 1.
  int batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_d = 0;
  // Row strides (leading dimensions) of the stored matrices; 0 = contiguous rows (the stored column
  // count). A larger stride reads or writes a column slice of a wider matrix, e.g. the q, k and v
  // parts of one fused projection output [tokens, q_dim + 2·kv_dim].
  int64_t lda = 0, ldb = 0, ldd = 0;
};

// Process-wide: a plan built while this is on asks cuBLASLt's heuristic for several algorithms and its
// first run times them on the call's operands, keeping the fastest when it is clearly faster (the
// setting cuda_gemm_autotune). Off: the heuristic's first, as cuBLASLt's own default.
void set_gemm_autotune(bool on);
bool gemm_autotune();

class GemmRunner {
 public:
  // `workspace_bytes` of device memory are owned by the runner and offered to every algorithm
  // (cuBLAS recommends 32 MiB on Hopper).
  explicit GemmRunner(size_t workspace_bytes = size_t{32} << 20);
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  // D = alpha * op(A) op(B) + beta * D (+ bias). `d` is __nv_bfloat16* or float* per shape.output.
  // Pointers must be 16-byte aligned. Errors name the shape and the cuBLAS status.
  void run(const GemmShape& shape, const __nv_bfloat16* a, const __nv_bfloat16* b, void* d, float alpha,
           float beta, cudaStream_t stream, const void* bias = nullptr);

  size_t cached_plans() const;  // how many distinct plans have been built
  double plan_seconds() const;  // host seconds spent building them (cuBLASLt's heuristic queries)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The linear-layer products above, for readability at call sites (stream-ordered, no sync).
void linear_forward(GemmRunner& g, const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int tokens,
                    int in_features, int out_features, cudaStream_t stream);
void linear_backward_input(GemmRunner& g, const __nv_bfloat16* dy, const __nv_bfloat16* w, __nv_bfloat16* dx,
                           int tokens, int in_features, int out_features, cudaStream_t stream);
// dw (fp32 [out, in]) = beta * dw + dyᵀ x; beta = 1 accumulates, 0 overwrites.
void linear_backward_weight(GemmRunner& g, const __nv_bfloat16* dy, const __nv_bfloat16* x, float* dw, int tokens,
                            int in_features, int out_features, float beta, cudaStream_t stream);

}  // namespace pgolf::cuda
