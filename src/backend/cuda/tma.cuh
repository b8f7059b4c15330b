// Hopper's tensor memory accelerator (TMA) and the barriers around it (sm_90a): transaction
// mbarriers in shared memory, 2-D tensor copies global → shared (one CTA, or multicast to every CTA
// of a cluster named in a mask), and thread-block-cluster helpers. Kernels that use these guard their
// bodies with __CUDA_ARCH_FEAT_SM90_ALL. Addresses are shared-memory (shared::cta) addresses; the
// tensor map is the generic address of a __grid_constant__ kernel parameter.
//
// An mbarrier counts arrivals and, for TMA, transaction bytes: a phase completes when the expected
// arrivals have arrived and the bytes announced with arrive_expect_tx have landed. Phases alternate
// parity 0, 1, 0, ...; mbarrier_wait(bar, parity) returns once the phase of that parity has completed.
#pragma once

#include <cstdint>

namespace pgolf::cuda {

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the initialized barriers visible to the cluster (other CTAs' arrivals and multicast copies).
__device__ __forceinline__ void fence_mbarrier_init_cluster() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// This thread's arrival, announcing `bytes` more transaction bytes for the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// `count` arrivals of this thread on the current phase (count >= 1).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar, uint32_t count = 1) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// An arrival on the barrier at the same shared-memory address in CTA `cta_rank` of the cluster.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t bar, uint32_t cta_rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(bar),
      "r"(cta_rank)
      : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred complete;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
        "selp.u32 %0, 1, 0, complete;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// The box at (inner, outer) (elements) of a 2-D tensor map → shared memory at `dst`; completion is
// counted on `bar` (this CTA's).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tensor_map, int inner, int outer, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(tensor_map), "r"(inner), "r"(outer), "r"(bar)
      : "memory");
}
// The same box to the same shared-memory offset `dst` of every CTA in `cta_mask`, each counting the
// bytes on its own barrier at offset `bar`.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const void* tensor_map, int inner, int outer,
                                                      uint32_t bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(dst),
      "l"(tensor_map), "r"(inner), "r"(outer), "r"(bar), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
// Every thread of every CTA of the cluster (all threads of each CTA must take part).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}

// Warp specialization: the warps of a warpgroup (all of them, together) lower or raise their
// register budget to kRegisters (24..256, a multiple of 8). Raising waits until other warpgroups of
// the CTA have released enough registers.
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace pgolf::cuda
