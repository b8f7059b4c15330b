#include <cstdint>

#include "backend/cuda/newton_schulz.h"
#include "optim/newton_schulz.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kA = static_cast<float>(optim::kNsA), kB = static_cast<float>(optim::kNsB),
                kC = static_cast<float>(optim::kNsC);

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// The elementwise ops of one iteration: out[i] = op(first[i], second[i]), every op's output in bf16.
struct ScaleByC {  // S = bf16(c·A)
  __device__ float operator()(float a, float) const { return bf16_round(kC * a); }
};
struct PolyScaleThenSquare {  // P = bf16(bf16(b·A) + Q), Q = (c·A)·A already in bf16
  __device__ float operator()(float a, float q) const { return bf16_round(bf16_round(kB * a) + q); }
};
struct PolySquareThenScale {  // P = bf16(bf16(b·A) + bf16(c·Q)), Q = A·A in bf16
  __device__ float operator()(float a, float q) const { return bf16_round(bf16_round(kB * a) + bf16_round(kC * q)); }
};
struct Combine {  // X ← bf16(bf16(a·X) + BX)
  __device__ float operator()(float x, float bx) const { return bf16_round(bf16_round(kA * x) + bx); }
};

// Eight bf16 values per 16-byte access; the count's remainder (count % 8) is done by the first threads.
// `out` may be `first` or `second` (in place: each element is read before it is written, by one thread).
template <typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_bf16(const __nv_bfloat16* first, const __nv_bfloat16* second,
                                                             __nv_bfloat16* out, int64_t count, Op op) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t vectors = count / 8;
  for (int64_t v = tid; v < vectors; v += stride) {
    const uint4 fa = reinterpret_cast<const uint4*>(first)[v];
    const uint4 sa = reinterpret_cast<const uint4*>(second)[v];
    const __nv_bfloat162* f2 = reinterpret_cast<const __nv_bfloat162*>(&fa);
    const __nv_bfloat162* s2 = reinterpret_cast<const __nv_bfloat162*>(&sa);
    uint4 result;
    __nv_bfloat162* r2 = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(f2[k]), s = __bfloat1622float2(s2[k]);
      r2[k] = __floats2bfloat162_rn(op(f.x, s.x), op(f.y, s.y));
    }
    reinterpret_cast<uint4*>(out)[v] = result;
  }
  for (int64_t i = vectors * 8 + tid; i < count; i += stride)
    out[i] = __float2bfloat16_rn(op(__bfloat162float(first[i]), __bfloat162float(second[i])));
}

template <typename Op>
void launch_elementwise(const __nv_bfloat16* first, const __nv_bfloat16* second, __nv_bfloat16* out, int64_t count,
                        Op op, cudaStream_t stream) {
  const int64_t blocks_needed = (count / 8 + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks_needed < 1 ? 1 : (blocks_needed > 4096 ? 4096 : blocks_needed));
  elementwise_bf16<<<blocks, kThreads, 0, stream>>>(first, second, out, count, op);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

BatchedNewtonSchulz::BatchedNewtonSchulz(int batch, int n, int m, NsForm form)
    : batch_(batch),
      n_(n),
      m_(m),
      form_(form),
      x_(static_cast<size_t>(batch) * n * m, "Newton-Schulz X"),
      bx_(static_cast<size_t>(batch) * n * m, "Newton-Schulz B·X"),
      a_(static_cast<size_t>(batch) * n * n, "Newton-Schulz A"),
      poly_(static_cast<size_t>(batch) * n * n, "Newton-Schulz B") {
  PG_CUDA_REQUIRE(batch >= 1 && n >= 1 && n <= m, "BatchedNewtonSchulz: needs batch >= 1 and 1 <= n <= m");
  if (form == NsForm::kScaleThenSquare)
    scaled_ = DeviceBuffer<__nv_bfloat16>(static_cast<size_t>(batch) * n * n, "Newton-Schulz c·A");
  for (auto* b : {&x_, &bx_, &a_, &scaled_, &poly_})
    if (b->size() > 0) b->fill_bytes(0);
}

double BatchedNewtonSchulz::flops_per_step() const {
  const double n = n_, m = m_;
  return 2.0 * batch_ * (n * n * m + n * n * n + n * n * m);
}

void BatchedNewtonSchulz::run(GemmRunner& gemm, int steps, cudaStream_t stream) {
  const int64_t nm = static_cast<int64_t>(n_) * m_, nn = static_cast<int64_t>(n_) * n_;
  GemmShape gram;  // A = X·Xᵀ: [n, m]·[m, n]
  gram.m = n_, gram.n = n_, gram.k = m_, gram.trans_b = true, gram.batch = batch_;
  gram.stride_a = nm, gram.stride_b = nm, gram.stride_d = nn;
  GemmShape square;  // [n, n]·[n, n]: (c·A)·A, or A·Aᵀ
  square.m = n_, square.n = n_, square.k = n_, square.batch = batch_;
  square.trans_b = form_ == NsForm::kSquareThenScale;
  square.stride_a = nn, square.stride_b = nn, square.stride_d = nn;
  GemmShape apply;  // B·X: [n, n]·[n, m]
  apply.m = n_, apply.n = m_, apply.k = n_, apply.batch = batch_;
  apply.stride_a = nn, apply.stride_b = nm, apply.stride_d = nm;

  const int64_t x_count = static_cast<int64_t>(batch_) * nm, a_count = static_cast<int64_t>(batch_) * nn;
  for (int it = 0; it < steps; ++it) {
    gemm.run(gram, x_.data(), x_.data(), a_.data(), 1.0f, 0.0f, stream);
    if (form_ == NsForm::kScaleThenSquare) {
      launch_elementwise(a_.data(), a_.data(), scaled_.data(), a_count, ScaleByC{}, stream);
      gemm.run(square, scaled_.data(), a_.data(), poly_.data(), 1.0f, 0.0f, stream);
      launch_elementwise(a_.data(), poly_.data(), poly_.data(), a_count, PolyScaleThenSquare{}, stream);
    } else {
      gemm.run(square, a_.data(), a_.data(), poly_.data(), 1.0f, 0.0f, stream);
      launch_elementwise(a_.data(), poly_.data(), poly_.data(), a_count, PolySquareThenScale{}, stream);
    }
    gemm.run(apply, poly_.data(), x_.data(), bx_.data(), 1.0f, 0.0f, stream);
    launch_elementwise(x_.data(), bx_.data(), x_.data(), x_count, Combine{}, stream);
  }
}

}  // namespace pgolf::cuda
