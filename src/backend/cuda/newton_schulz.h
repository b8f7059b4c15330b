// Newton–Schulz orthogonalisation (SPEC §4.2) of a batch of equally shaped wide matrices in bf16 on
// the tensor cores, the twin of optim/newton_schulz.h's bf16 emulation: every op's output is rounded
// to bf16 where the references' eager bf16 ops round it. One iteration is three strided-batched
// cuBLASLt products (fp32 accumulation, bf16 output) and the elementwise ops between them:
//
//   A = X·Xᵀ                                   product, bf16
//   ScaleThenSquare (per-matrix Muon):  S = bf16(c·A); Q = S·A;  P = bf16(bf16(b·A) + Q)
//   SquareThenScale (banked Muon):      Q = A·Aᵀ;    P = bf16(bf16(b·A) + bf16(c·Q))
//   BX = P·X                                   product, bf16
//   X ← bf16(bf16(a·X) + BX)
//
// (A is symmetric, so A·A is computed as A·Aᵀ, as the CPU does.) X [batch, n, m] with n <= m is
// already normalised by its Frobenius norm and is orthogonalised in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backend/cuda/arena.h"
#include "backend/cuda/gemm.h"

namespace pgolf::cuda {

enum class NsForm { kScaleThenSquare, kSquareThenScale };

class BatchedNewtonSchulz {
 public:
  // Buffers for `batch` matrices of [n, m] (1 <= n <= m); every buffer starts zeroed.
  BatchedNewtonSchulz(int batch, int n, int m, NsForm form);

  // `steps` iterations on x() in place, stream-ordered (capturable once the GEMM plans exist: the
  // first call on a runner builds them).
  void run(GemmRunner& gemm, int steps, cudaStream_t stream);

  __nv_bfloat16* x() { return x_.data(); }
  int batch() const { return batch_; }
  int n() const { return n_; }
  int m() const { return m_; }
  NsForm form() const { return form_; }
  double flops_per_step() const;  // of the three products of one iteration over the batch

 private:
  int batch_, n_, m_;
  NsForm form_;
  DeviceBuffer<__nv_bfloat16> x_, bx_;  // [batch, n, m]
  DeviceBuffer<__nv_bfloat16> a_, scaled_,
      poly_;  // [batch, n, n] (scaled_: ScaleThenSquare only; poly_ holds Q, then B)
};

}  // namespace pgolf::cuda
