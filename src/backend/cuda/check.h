// CUDA error checking: every runtime / cuBLAS call is checked; failures name the call, file and line.
// .cu files include this header and never fmt (nvcc's front end cannot evaluate fmt's consteval
// format checks): the message is formatted in check.cpp, compiled as C++.
#pragma once

#include <cuda_runtime.h>

namespace pgolf::cuda {
[[noreturn]] void raise_cuda_error(int code, const char* text, const char* expr, const char* file, int line);
[[noreturn]] void raise_error(const char* what, const char* file, int line);  // a plain pgolf::Error
}  // namespace pgolf::cuda

#define PG_CUDA_CHECK(expr)                                                                          \
  do {                                                                                               \
    cudaError_t pg_err_ = (expr);                                                                    \
    if (pg_err_ != cudaSuccess)                                                                      \
      ::pgolf::cuda::raise_cuda_error(static_cast<int>(pg_err_), cudaGetErrorString(pg_err_), #expr, \
                                      __FILE__, __LINE__);                                           \
  } while (0)

// After a kernel launch: reports launch-configuration errors immediately (no device sync).
#define PG_CUDA_LAUNCH_CHECK() PG_CUDA_CHECK(cudaGetLastError())

#define PG_CUDA_REQUIRE(cond, what)                                     \
  do {                                                                  \
    if (!(cond)) ::pgolf::cuda::raise_error((what), __FILE__, __LINE__); \
  } while (0)
