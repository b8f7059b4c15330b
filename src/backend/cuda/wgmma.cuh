// Hopper warpgroup MMA building blocks (sm_90a): shared-memory matrix descriptors for the
// 128-byte-swizzled tiles of mma.cuh (SwizzledTile64), wgmma.mma_async m64n64k16 bf16 → fp32 with A
// in registers or in shared memory, and the fences and waits around it. The instructions exist only
// on sm_90a: kernels that use these guard their bodies with __CUDA_ARCH_FEAT_SM90_ALL.
//
// A warpgroup is 4 consecutive warps starting at a warp index divisible by 4; it issues one wgmma
// together. Register fragments of m64nNk16 (PTX ISA "Register fragments"), per warp w of the group
// (rows 16w..16w+15 of the 64), g = lane / 4, t = lane % 4 — the mma.m16n8k16 layouts per warp:
//   A (64x16 bf16, 4 registers of 2 bf16): {row g, cols 2t, 2t+1}, {row g+8, same cols},
//                                            {row g, cols 2t+8, 2t+9}, {row g+8, cols 2t+8, 2t+9}
//   D (64xN fp32, N/2 floats): d[4j + e] = row g + 8·(e / 2), col 8j + 2t + (e % 2), j < N/8
// so the fp32 D of S = Q·Kᵀ, rounded to bf16 in pairs, is the A operand of P·V with no data movement.
//
// Shared-memory tiles. A SwizzledTile64 stores rows of 64 bf16 (128 bytes, 8 chunks of 16 bytes),
// chunk c of row r at chunk c ^ (r % 8). When the tile starts on a 1024-byte boundary this is exactly
// the hardware's 128-byte swizzle (address bits [4,7) XOR address bits [7,10)): each group of 8 rows
// is one 1024-byte "swizzle atom". Both operand orders of wgmma read such a tile:
//   K-major B (e.g. K[key][dh] for S = Q·Kᵀ: N = keys, K = dh, dh contiguous). One instruction reads
//     N rows × 16 dh (32 bytes of each 128-byte row). Canonical form in 16-byte units:
//     ((8 rows, N/8 groups), (2 chunks)) : ((8, SBO), (1)), i.e. rows 128 bytes apart, groups of 8 rows
//     SBO = 1024 bytes apart, the two 16-byte chunks of the k-slice adjacent. The k-slice kk (dh
//     16kk..16kk+15) starts 32·kk bytes into row 0: the hardware forms the unswizzled address
//     start + 128·r + 16·c and then XORs bits [7,10) (= r % 8) into bits [4,7) (= 2kk + c), which is
//     where SwizzledTile64 put chunk 2kk + c of row r. The leading byte offset is unused for swizzled
//     K-major layouts.
//   MN-major B (imm-trans-b = 1; e.g. V[key][dh] for O = P·V: K = keys, N = dh, dh contiguous). One
//     instruction reads 16 keys × N = 64 dh. Canonical form in 16-byte units:
//     ((8 chunks, N/64 atoms), (8 rows, K/8 groups)) : ((1, LBO), (8, SBO)), i.e. 64 dh contiguous
//     (swizzled) in a 128-byte row, one row per key, groups of 8 keys SBO = 1024 bytes apart; LBO
//     would step to the next 64 dh, which a 64-wide tile never has. Keys 16kk.. start at 2048·kk
//     bytes, an atom boundary.
// In both cases every descriptor start is an atom boundary or 32/64/96 bytes into one, the matrix
// base offset field is 0, and the unused LBO is given the same 1024 bytes as SBO.
//
// The A operand (64 rows of m) can come from such a tile too (wgmma_m64n64k16_bf16_ss), with the same
// two canonical forms and so the same step descriptors: K-major A (imm-trans-a 0) is a tile whose rows
// are m (64 rows = 8 atoms, e.g. K[key][dh] as the A of Sᵀ = K·Qᵀ), exactly like K-major B with rows n;
// MN-major A (imm-trans-a 1) is a tile whose rows are k and whose 64 contiguous values are m (e.g.
// dSᵀ[key][query] as the A = dS of dQ = dS·K), exactly like MN-major B.
#pragma once

#include <cstdint>

namespace pgolf::cuda {

constexpr int kSwizzleAtomBytes = 1024;  // SwizzledTile64 starts must be aligned to this (see above)

// Descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start address >> 4, 16-29 leading byte
// offset >> 4, 32-45 stride byte offset >> 4, 49-51 base offset (0), 62-63 swizzle (1 = 128 bytes).
// `address` is a shared-memory address inside a SwizzledTile64 whose start is 1024-byte aligned.
// `leading_bytes` (LBO) matters only to an MN-major operand wider than 64 (wgmma n128 with B stored
// as 64-wide column blocks): the distance between its blocks of 64 values of n.
__device__ __forceinline__ uint64_t swizzled_tile_descriptor(uint32_t address, uint32_t leading_bytes = 1024) {
  constexpr uint64_t kAtomBytesEncoded = 1024 >> 4;  // SBO: 8 rows of 128 bytes
  return static_cast<uint64_t>((address >> 4) & 0x3FFFu) | (static_cast<uint64_t>(leading_bytes >> 4) << 16) |
         (kAtomBytesEncoded << 32) | (uint64_t{1} << 62);
}

// The B operand of k-step kk (16 values of k) from a 1024-byte-aligned SwizzledTile64 at tile_base:
//   rows are n (K-major, e.g. K[key][dh]; imm-trans-b 0): k = 16kk.. are 32·kk bytes into each row;
//   rows are k (MN-major, e.g. V[key][dh]; imm-trans-b 1): rows 16kk.. start 16 rows = 2048·kk bytes on.
__device__ __forceinline__ uint64_t k_major_step_descriptor(uint32_t tile_base, int kk) {
  return swizzled_tile_descriptor(tile_base + static_cast<uint32_t>(kk * 32));
}
__device__ __forceinline__ uint64_t mn_major_step_descriptor(uint32_t tile_base, int kk) {
  return swizzled_tile_descriptor(tile_base + static_cast<uint32_t>(kk * 16 * 128));
}

// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async after its wait)
// before later async-proxy reads (wgmma operands) by any thread that synchronizes with it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Before the first wgmma of a batch: makes this warpgroup's register writes (accumulators, A
// fragments) and shared-memory accesses visible to the asynchronous MMAs.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending committed wgmma groups of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// After wgmma_wait: a register the asynchronous MMA wrote gets a new definition here, so that no
// read of it is scheduled before the wait.
template <int kCount>
__device__ __forceinline__ void wgmma_fence_operands(float (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// d (64x64 fp32, layout above) = a (64x16 bf16, registers) · B (16x64 bf16, descriptor) + (kAccumulate ?
// d : 0). kTransposeB = 0: B is K-major (rows = n); 1: B is MN-major (rows = k). Asynchronous: d and a
// must not be touched until wgmma_wait; issue wgmma_fence before the first call of a batch.
template <bool kAccumulate, int kTransposeB>
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float (&d)[32], const uint32_t (&a)[4], uint64_t b_descriptor) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, %38;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor), "r"(kAccumulate ? 1 : 0), "n"(kTransposeB));
}

// d (64x64 fp32) = A (64x16 bf16, descriptor) · B (16x64 bf16, descriptor) + (kAccumulate ? d : 0).
// kTransposeA = 0: A is K-major (rows = m); 1: A is MN-major (rows = k). kTransposeB as above.
template <bool kAccumulate, int kTransposeA, int kTransposeB>
__device__ __forceinline__ void wgmma_m64n64k16_bf16_ss(float (&d)[32], uint64_t a_descriptor,
                                                        uint64_t b_descriptor) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, accumulate, 1, 1, %35, %36;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a_descriptor), "l"(b_descriptor), "r"(kAccumulate ? 1 : 0), "n"(kTransposeA), "n"(kTransposeB));
}

// d (64x128 fp32: d[4j + e] = row g + 8·(e / 2), col 8j + 2t + (e % 2), j < 16) = A (64x16, descriptor)
// · B (16x128, descriptor) + (accumulate ? d : 0), `accumulate` chosen at run time. A K-major B (rows =
// n) is one SwizzledTile64 of 128 rows; an MN-major B (rows = k) is two 64-wide tiles, the second
// `leading_bytes` after the first (swizzled_tile_descriptor).
template <int kTransposeA, int kTransposeB>
__device__ __forceinline__ void wgmma_m64n128k16_bf16_ss(float (&d)[64], uint64_t a_descriptor, uint64_t b_descriptor,
                                                         bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, accumulate, 1, 1, %67, %68;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a_descriptor), "l"(b_descriptor), "r"(accumulate ? 1 : 0), "n"(kTransposeA), "n"(kTransposeB));
}

}  // namespace pgolf::cuda
