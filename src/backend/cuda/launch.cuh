// Kernel launches with programmatic dependent launch (PDL, Hopper): a kernel launched by launch_kernel may
// be scheduled while the kernel before it on the stream is finishing, instead of after the launch latency
// that follows that kernel's end; back-to-back row passes then lose less time between them. Every kernel
// launched this way starts with pdl_prologue(): it waits until the kernels before it have completed and
// their writes are visible (griddepcontrol.wait) before it touches memory, so the order of the stream is
// kept, and it lets the kernel after it be scheduled early (griddepcontrol.launch_dependents). A kernel
// launched the ordinary way, and a graph of either kind, keep the plain order.
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/check.h"

namespace pgolf::cuda {

// Process-wide: PDL attributes on launch_kernel launches (on by default; off launches them the ordinary way).
void set_programmatic_launch(bool on);
bool programmatic_launch();

__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic_launch() ? 1 : 0;
  PG_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace pgolf::cuda
