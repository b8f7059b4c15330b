// Warp-level tensor-core building blocks (sm_80+ instructions, used on Hopper too): ldmatrix,
// mma.sync m16n8k16 bf16 → fp32, cp.async, and the XOR-swizzled shared-memory tile of 64-wide bf16
// rows that every attention kernel stages its operands in.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), with g = lane / 4 and t = lane % 4:
//   A (16x16, row-major) 4 registers of 2 bf16: {row g, cols 2t..2t+1}, {row g+8, same cols},
//                                                {row g, cols 2t+8..}, {row g+8, cols 2t+8..}
//   B (16x8, "col")      2 registers: {rows 2t..2t+1, col g}, {rows 2t+8..2t+9, col g}
//   C (16x8 fp32)        4 floats: {row g, cols 2t, 2t+1}, {row g+8, cols 2t, 2t+1}
// The C fragments of two n-adjacent 16x8 tiles, converted to bf16, are exactly the A fragment of
// the 16x16 tile they form — which is how P = softmax(S) feeds P·V without shared memory.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace pgolf::cuda {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane i gives the row address of matrix i / 8, row i % 8. Lane l receives,
// for each matrix, row l / 4, columns 2(l % 4) and 2(l % 4) + 1 (with .trans: of the transpose).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d += a · b, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 (round to nearest even) in one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 16 bytes global → shared, asynchronously; when !valid nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
// 4 bytes global → shared (zero-filled when !valid).
__device__ __forceinline__ void cp_async_4(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// A shared-memory tile of rows of 64 bf16 (128 bytes = 8 chunks of 16 bytes). Chunk c of row r is
// stored at chunk c ^ (r % 8): the 8 rows an ldmatrix phase reads at one logical column then fall
// in 8 different bank groups (no conflicts), and 16-byte cp.async stores stay whole.
struct SwizzledTile64 {
  uint32_t base;  // shared-memory address of row 0

  __device__ __forceinline__ uint32_t chunk_address(int row, int chunk) const {
    return base + static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
  }
  // Address of element (row, col), col even: for 4-byte stores of bf16 pairs.
  __device__ __forceinline__ uint32_t pair_address(int row, int col) const {
    return chunk_address(row, col >> 3) + static_cast<uint32_t>((col & 7) * 2);
  }

  // Copies rows [0, kRows) from global memory (row r at `src + r * row_stride`, 64 contiguous
  // bf16), zero-filling rows >= valid_rows; kThreads threads cooperate, `tid` is this thread's.
  template <int kRows, int kThreads>
  __device__ __forceinline__ void load_async(const __nv_bfloat16* src, int64_t row_stride, int valid_rows,
                                             int tid) const {
    static_assert((kRows * 8) % kThreads == 0, "each thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < kRows * 8 / kThreads; ++i) {
      int chunk_index = tid + i * kThreads;
      int row = chunk_index >> 3, chunk = chunk_index & 7;
      bool valid = row < valid_rows;
      const __nv_bfloat16* g = valid ? src + row * row_stride + chunk * 8 : src;
      cp_async_16(chunk_address(row, chunk), g, valid);
    }
  }
};

// ldmatrix addressing for a 16x16 block of a SwizzledTile64 at (row0, col0), col0 a multiple of 16.
//   a_fragment: the block as an mma A operand (rows = m, cols = k), non-transposed.
//   b_pair:     the block holds rows = n, cols = k (e.g. K [key][dh] for S = Q Kᵀ); r[0..1] are the
//               B fragment of n-rows row0..row0+7, r[2..3] of row0+8..row0+15.
//   b_pair_trans: the block holds rows = k, cols = n (e.g. V [key][dh] for O = P V); r[0..1] are the
//               B fragment of n-cols col0..col0+7, r[2..3] of col0+8..col0+15.
//   a_fragment_trans: the block holds rows = k, cols = m (an A operand stored transposed).
__device__ __forceinline__ uint32_t a_fragment_address(const SwizzledTile64& t, int row0, int col0, int lane) {
  return t.chunk_address(row0 + (lane & 15), (col0 >> 3) + (lane >> 4));
}
__device__ __forceinline__ uint32_t b_pair_address(const SwizzledTile64& t, int row0, int col0, int lane) {
  return t.chunk_address(row0 + (lane & 7) + ((lane >> 4) << 3), (col0 >> 3) + ((lane >> 3) & 1));
}
__device__ __forceinline__ uint32_t b_pair_trans_address(const SwizzledTile64& t, int row0, int col0, int lane) {
  return t.chunk_address(row0 + (lane & 7) + (((lane >> 3) & 1) << 3), (col0 >> 3) + (lane >> 4));
}
// The transposed A operand needs its matrices in the same order as b_pair: (row0, col0),
// (row0, col0 + 8), (row0 + 8, col0), (row0 + 8, col0 + 8) of the stored block.
__device__ __forceinline__ uint32_t a_fragment_trans_address(const SwizzledTile64& t, int row0, int col0, int lane) {
  return b_pair_address(t, row0, col0, lane);
}

}  // namespace pgolf::cuda
