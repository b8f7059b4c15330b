#include <algorithm>
#include <atomic>

#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/lora.h"

namespace pgolf::cuda {
namespace {

int64_t ld_or(int64_t ld, int cols) { return ld > 0 ? ld : cols; }
int64_t a_stride(const LoraGemmShape& s) { return s.a_stride > 0 ? s.a_stride : int64_t{s.rank} * s.in; }

void check_shape(const LoraGemmShape& s) {
  PG_CUDA_REQUIRE(s.rows > 0 && s.seq_len > 0 && s.rank > 0 && s.in > 0 && s.out > 0,
                  "LoRA: every size must be positive");
  PG_CUDA_REQUIRE(s.rank % 8 == 0 && s.in % 8 == 0 && s.out % 8 == 0,
                  "LoRA: rank, in and out must be multiples of 8 (16-byte rows for the GEMMs)");
}

__global__ void lora_uniform_kernel(float* dst, int64_t n, uint64_t seed, uint64_t first, double lo, double span,
                                    int64_t block, int64_t block_stride) {
  pdl_prologue();
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = seed + (first + static_cast<uint64_t>(k) + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const double u = static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
    dst[(k / block) * block_stride + k % block] = static_cast<float>(__dadd_rn(lo, __dmul_rn(span, u)));
  }
}

// Block (x, s) walks rows [0, rows) of segment s with a grid stride over gridDim.x blocks: value i of
// the segment's rows, or with PG_SEGMENT_LOOP4 the values [4i, 4i + 4).
#define PG_SEGMENT_LOOP_BY(i, base, segments, rows, width)                                          \
  const LoraRowSegment seg_ = segments[blockIdx.y];                                               \
  const int64_t base = seg_.offset, n_ = (rows) * seg_.per_row / (width);                          \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_;          \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
#define PG_SEGMENT_LOOP(i, base, segments, rows) PG_SEGMENT_LOOP_BY(i, base, segments, rows, 1)
#define PG_SEGMENT_LOOP4(i, base, segments, rows) PG_SEGMENT_LOOP_BY(i, base, segments, rows, 4)

// A segment whose offset and per-row count are multiples of 4 is walked 4 values a thread (16-byte fp32
// accesses, 8-byte bf16 ones) when `vec4` says that the arrays' addresses allow it; the arithmetic is
// the same, value by value, so the bits are too.
__device__ __forceinline__ bool segment_vec4(const LoraRowSegment& seg, bool vec4) {
  return vec4 && seg.offset % 4 == 0 && seg.per_row % 4 == 0;
}

__device__ __forceinline__ void store_bf16x4(__nv_bfloat16* dst, float a, float b, float c, float d) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 bits;
  bits.x = *reinterpret_cast<const uint32_t*>(&lo);
  bits.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(dst) = bits;
}

__global__ void rows_to_bf16_kernel(const float* __restrict__ in, __nv_bfloat16* __restrict__ out,
                                    const LoraRowSegment* __restrict__ segments, int64_t rows, bool vec4) {
  pdl_prologue();
  if (segment_vec4(segments[blockIdx.y], vec4)) {
    PG_SEGMENT_LOOP4(q, base, segments, rows) {
      const float4 x = *reinterpret_cast<const float4*>(in + base + 4 * q);
      store_bf16x4(out + base + 4 * q, x.x, x.y, x.z, x.w);
    }
    return;
  }
  PG_SEGMENT_LOOP(i, base, segments, rows) out[base + i] = __float2bfloat16(in[base + i]);
}

__global__ void rows_adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                  float* __restrict__ v, __nv_bfloat16* __restrict__ p16,
                                  const optim::AdamCoeffs* __restrict__ coeffs,
                                  const LoraRowSegment* __restrict__ segments, int64_t rows, bool vec4) {
  pdl_prologue();
  const optim::AdamCoeffs c = *coeffs;
  if (segment_vec4(segments[blockIdx.y], vec4)) {
    PG_SEGMENT_LOOP4(q, base, segments, rows) {
      const int64_t k = base + 4 * q;
      float4 pk = *reinterpret_cast<const float4*>(p + k), vk = *reinterpret_cast<const float4*>(v + k);
      const float4 gk = *reinterpret_cast<const float4*>(g + k);
      float4 mk = m ? *reinterpret_cast<const float4*>(m + k) : make_float4(0.f, 0.f, 0.f, 0.f);
      optim::adamw_update(pk.x, gk.x, mk.x, vk.x, c);
      optim::adamw_update(pk.y, gk.y, mk.y, vk.y, c);
      optim::adamw_update(pk.z, gk.z, mk.z, vk.z, c);
      optim::adamw_update(pk.w, gk.w, mk.w, vk.w, c);
      *reinterpret_cast<float4*>(p + k) = pk;
      *reinterpret_cast<float4*>(v + k) = vk;
      if (m) *reinterpret_cast<float4*>(m + k) = mk;
      if (p16) store_bf16x4(p16 + k, pk.x, pk.y, pk.z, pk.w);
    }
    return;
  }
  PG_SEGMENT_LOOP(i, base, segments, rows) {
    const int64_t k = base + i;
    float pk = p[k], mk = m ? m[k] : 0.f, vk = v[k];  // no m: beta1 = 0, the first moment is g
    optim::adamw_update(pk, g[k], mk, vk, c);
    p[k] = pk, v[k] = vk;
    if (m) m[k] = mk;
    if (p16) p16[k] = __float2bfloat16(pk);
  }
}

__global__ void write_adam_coeffs_kernel(optim::AdamCoeffs* device, const optim::AdamCoeffs value) {
  pdl_prologue();
  *device = value;
}

constexpr int kRowThreads = 256;
std::atomic<bool> g_lora_vector_access{true};

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }  // null too

dim3 segment_grid(int count, int64_t rows, int64_t max_per_row) {
  const int64_t per_block = int64_t{kRowThreads} * 4;  // about four values per thread
  const int64_t x = std::clamp<int64_t>((rows * max_per_row + per_block - 1) / per_block, 1, 1024);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(count));
}

}  // namespace

void set_lora_vector_access(bool on) { g_lora_vector_access = on; }
bool lora_vector_access() { return g_lora_vector_access; }

void lora_rows_to_bf16(const float* in, __nv_bfloat16* out, const LoraRowSegment* segments, int count, int64_t rows,
                       int64_t max_per_row, cudaStream_t stream) {
  if (count == 0 || rows <= 0) return;
  launch_kernel(rows_to_bf16_kernel, segment_grid(count, rows, max_per_row), kRowThreads, 0, stream, in, out, segments,
                rows, aligned(in, 16) && aligned(out, 8) && lora_vector_access());
  PG_CUDA_CHECK(cudaGetLastError());
}

void lora_rows_adamw(float* p, const float* g, float* m, float* v, __nv_bfloat16* p16, const optim::AdamCoeffs* coeffs,
                     const LoraRowSegment* segments, int count, int64_t rows, int64_t max_per_row, cudaStream_t stream) {
  if (count == 0 || rows <= 0) return;
  const bool vec4 = aligned(p, 16) && aligned(g, 16) && aligned(m, 16) && aligned(v, 16) && aligned(p16, 8) &&
                    lora_vector_access();
  launch_kernel(rows_adamw_kernel, segment_grid(count, rows, max_per_row), kRowThreads, 0, stream, p, g, m, v, p16,
                coeffs, segments, rows, vec4);
  PG_CUDA_CHECK(cudaGetLastError());
}

void write_adam_coeffs(optim::AdamCoeffs* device, const optim::AdamCoeffs& value, cudaStream_t stream) {
  launch_kernel(write_adam_coeffs_kernel, 1, 1, 0, stream, device, value);
  PG_CUDA_CHECK(cudaGetLastError());
}

void lora_uniform(float* dst, int64_t n, uint64_t seed, uint64_t first, double bound, int64_t block,
                  int64_t block_stride, cudaStream_t stream) {
  if (n <= 0) return;
  PG_CUDA_REQUIRE(block > 0 && block_stride >= block, "lora_uniform: blocks must be non-empty and must not overlap");
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 132 * 32);
  // Rng::uniform(lo, hi) = lo + (hi - lo) · u with lo = -bound, hi = bound.
  const double lo = -bound, span = bound - lo;
  launch_kernel(lora_uniform_kernel, static_cast<unsigned>(blocks), threads, 0, stream, dst, n, seed, first, lo, span,
                block, block_stride);
  PG_CUDA_CHECK(cudaGetLastError());
}

namespace {

// One operand of a batched product: row b's matrix at ptr + b·stride, rows `ld` elements apart.
struct Operand {
  const __nv_bfloat16* ptr;
  int64_t ld, stride;
};

// D_b [m, n] = op(A_b)·op(B_b) (+ beta·D_b) for the `rows` batch rows.
void run_batched(GemmRunner& gemm, int m, int n, int k, bool trans_a, bool trans_b, int rows, Operand a, Operand b,
                 void* d, int64_t ldd, int64_t stride_d, GemmOutput output, float beta, cudaStream_t stream) {
  GemmShape g;
  g.m = m, g.n = n, g.k = k, g.trans_a = trans_a, g.trans_b = trans_b, g.output = output;
  g.batch = rows, g.stride_a = a.stride, g.stride_b = b.stride, g.stride_d = stride_d;
  g.lda = a.ld, g.ldb = b.ld, g.ldd = ldd;
  gemm.run(g, a.ptr, b.ptr, d, 1.f, beta, stream);
}

}  // namespace

void lora_hidden(GemmRunner& gemm, const __nv_bfloat16* x, const __nv_bfloat16* A, __nv_bfloat16* h,
                 const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  const int64_t x_ld = ld_or(s.x_ld, s.in), h_ld = ld_or(s.h_ld, s.rank), T = s.seq_len;
  // h_b [T, r] = x_b [T, in] · A_bᵀ
  run_batched(gemm, s.seq_len, s.rank, s.in, false, true, s.rows, {x, x_ld, T * x_ld}, {A, s.in, a_stride(s)}, h, h_ld,
              T * h_ld, GemmOutput::kBf16, 0.f, stream);
}

void lora_apply(GemmRunner& gemm, const __nv_bfloat16* h, const __nv_bfloat16* B, __nv_bfloat16* y,
                const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  const int64_t y_ld = ld_or(s.y_ld, s.out), h_ld = ld_or(s.h_ld, s.rank), T = s.seq_len, r = s.rank;
  // y_b [T, out] += h_b [T, r] · B_bᵀ
  run_batched(gemm, s.seq_len, s.out, s.rank, false, true, s.rows, {h, h_ld, T * h_ld}, {B, r, int64_t{s.out} * r}, y,
              y_ld, T * y_ld, GemmOutput::kBf16, 1.f, stream);
}

void lora_forward(GemmRunner& gemm, const __nv_bfloat16* x, const __nv_bfloat16* A, const __nv_bfloat16* B,
                  __nv_bfloat16* h, __nv_bfloat16* y, const LoraGemmShape& s, cudaStream_t stream) {
  lora_hidden(gemm, x, A, h, s, stream);
  lora_apply(gemm, h, B, y, s, stream);
}

void lora_grad_b(GemmRunner& gemm, const __nv_bfloat16* dy, const __nv_bfloat16* h, float* dB,
                 const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  const int64_t y_ld = ld_or(s.y_ld, s.out), h_ld = ld_or(s.h_ld, s.rank), T = s.seq_len, r = s.rank;
  // dB_b [out, r] += dy_bᵀ [out, T] · h_b [T, r]
  run_batched(gemm, s.out, s.rank, s.seq_len, true, false, s.rows, {dy, y_ld, T * y_ld}, {h, h_ld, T * h_ld}, dB, r,
              int64_t{s.out} * r, GemmOutput::kF32, s.accumulate ? 1.f : 0.f, stream);
}

void lora_grad_a(GemmRunner& gemm, const __nv_bfloat16* dh, const __nv_bfloat16* x, float* dA,
                 const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  const int64_t x_ld = ld_or(s.x_ld, s.in), h_ld = ld_or(s.h_ld, s.rank), T = s.seq_len;
  // dA_b [r, in] += dh_bᵀ [r, T] · x_b [T, in]
  run_batched(gemm, s.rank, s.in, s.seq_len, true, false, s.rows, {dh, h_ld, T * h_ld}, {x, x_ld, T * x_ld}, dA, s.in,
              a_stride(s), GemmOutput::kF32, s.accumulate ? 1.f : 0.f, stream);
}

void lora_backward_out(GemmRunner& gemm, const __nv_bfloat16* dy, const __nv_bfloat16* B, const __nv_bfloat16* h,
                       __nv_bfloat16* dh, float* dB, const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  if (dB) lora_grad_b(gemm, dy, h, dB, s, stream);
  const int64_t y_ld = ld_or(s.y_ld, s.out), h_ld = ld_or(s.h_ld, s.rank), T = s.seq_len, r = s.rank;
  // dh_b [T, r] = dy_b [T, out] · B_b [out, r]
  run_batched(gemm, s.seq_len, s.rank, s.out, false, false, s.rows, {dy, y_ld, T * y_ld}, {B, r, int64_t{s.out} * r},
              dh, h_ld, T * h_ld, GemmOutput::kBf16, 0.f, stream);
}

void lora_backward_in(GemmRunner& gemm, const __nv_bfloat16* dh, const __nv_bfloat16* x, const __nv_bfloat16* A,
                      float* dA, float* dx, const LoraGemmShape& s, cudaStream_t stream) {
  check_shape(s);
  if (dA) lora_grad_a(gemm, dh, x, dA, s, stream);
  if (!dx) return;
  const int64_t x_ld = ld_or(s.x_ld, s.in), h_ld = ld_or(s.h_ld, s.rank), T = s.seq_len;
  // dx_b [T, in] += dh_b [T, r] · A_b [r, in]
  run_batched(gemm, s.seq_len, s.in, s.rank, false, false, s.rows, {dh, h_ld, T * h_ld}, {A, s.in, a_stride(s)}, dx,
              x_ld, T * x_ld, GemmOutput::kF32, 1.f, stream);
}


}  // namespace pgolf::cuda
