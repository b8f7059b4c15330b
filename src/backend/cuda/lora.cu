#include "backend/cuda/check.h"
#include "backend/cuda/lora.h"

namespace pgolf::cuda {
namespace {

int64_t ld_or(int64_t ld, int cols) { return ld > 0 ? ld : cols; }

void check_shape(const LoraGemmShape& s) {
  PG_CUDA_REQUIRE(s.rows > 0 && s.seq_len > 0 && s.rank > 0 && s.in > 0 && s.out > 0,
                  "LoRA: every size must be positive");
  PG_CUDA_REQUIRE(s.rank % 8 == 0 && s.in % 8 == 0 && s.out % 8 == 0,
                  "LoRA: rank, in and out must be multiples of 8 (16-byte rows for the GEMMs)");
}

// A batch of `rows` products, one per batch row, with per-row strides.
GemmShape batched(int m, int n, int k, bool trans_a, bool trans_b, int rows, int64_t stride_a, int64_t stride_b,
                  int64_t stride_d, GemmOutput output) {
  GemmShape g;
  g.m = m, g.n = n, g.k = k, g.trans_a = trans_a, g.trans_b = trans_b, g.output = output;
  g.batch = rows, g.stride_a = stride_a, g.stride_b = stride_b, g.stride_d = stride_d;
  return g;
}

}  // namespace

void lora_forward(GemmRunner& gemm, const __nv_bfloat16* x, const __nv_bfloat16* A, const __nv_bfloat16* B,
                  __nv_bfloat16* h, __nv_bfloat16* y, const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  const int64_t x_ld = ld_or(s.x_ld, s.in), y_ld = ld_or(s.y_ld, s.out), T = s.seq_len, r = s.rank;
  // h_b [T, r] = x_b [T, in] · A_bᵀ
  GemmShape g1 = batched(s.seq_len, s.rank, s.in, false, true, s.rows, T * x_ld, r * s.in, T * r, GemmOutput::kBf16);
  g1.lda = x_ld;
  gemm.run(g1, x, A, h, 1.f, 0.f, stream);
  // y_b [T, out] += h_b [T, r] · B_bᵀ
  GemmShape g2 = batched(s.seq_len, s.out, s.rank, false, true, s.rows, T * r, int64_t{s.out} * r, T * y_ld,
                         GemmOutput::kBf16);
  g2.ldd = y_ld;
  gemm.run(g2, h, B, y, 1.f, 1.f, stream);
}

void lora_backward(GemmRunner& gemm, const __nv_bfloat16* dy, const __nv_bfloat16* x, const __nv_bfloat16* A,
                   const __nv_bfloat16* B, const __nv_bfloat16* h, __nv_bfloat16* dh, float* dx, float* dA, float* dB,
                   const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  const int64_t x_ld = ld_or(s.x_ld, s.in), y_ld = ld_or(s.y_ld, s.out), T = s.seq_len, r = s.rank;
  // dB_b [out, r] += dy_bᵀ [out, T] · h_b [T, r]
  GemmShape g1 = batched(s.out, s.rank, s.seq_len, true, false, s.rows, T * y_ld, T * r, int64_t{s.out} * r,
                         GemmOutput::kF32);
  g1.lda = y_ld;
  gemm.run(g1, dy, h, dB, 1.f, 1.f, stream);
  // dh_b [T, r] = dy_b [T, out] · B_b [out, r]
  GemmShape g2 = batched(s.seq_len, s.rank, s.out, false, false, s.rows, T * y_ld, int64_t{s.out} * r, T * r,
                         GemmOutput::kBf16);
  g2.lda = y_ld;
  gemm.run(g2, dy, B, dh, 1.f, 0.f, stream);
  // dA_b [r, in] += dh_bᵀ [r, T] · x_b [T, in]
  GemmShape g3 = batched(s.rank, s.in, s.seq_len, true, false, s.rows, T * r, T * x_ld, r * s.in, GemmOutput::kF32);
  g3.ldb = x_ld;
  gemm.run(g3, dh, x, dA, 1.f, 1.f, stream);
  if (!dx) return;
  // dx_b [T, in] += dh_b [T, r] · A_b [r, in]
  GemmShape g4 = batched(s.seq_len, s.in, s.rank, false, false, s.rows, T * r, r * s.in, T * x_ld, GemmOutput::kF32);
  g4.ldd = x_ld;
  gemm.run(g4, dh, A, dx, 1.f, 1.f, stream);
}

}  // namespace pgolf::cuda
