// Helpers for the tests of the model's CUDA ops against their CPU twins (src/backend/cpu): every op
// runs three times on the same bf16-exact inputs —
//   ref:   the CPU twin in fp64 (the exact answer for these inputs);
//   naive: the CPU twin in fp32 with every tensor the GPU stores in bf16 rounded to bf16 at the same
//          point (the "naive same-precision computation" of ENGINEERING §4);
//   got:   the GPU op.
// and the GPU's max error against ref must be at most k times naive's. k = 2 where the outputs are
// bf16 (both errors are dominated by the same roundings to bf16; a different rounding of a near-tie or
// an fp32 sum in another order can make one of them up to twice the other), k = 4 where the outputs
// are fp32 accumulations (both errors are fp32 summation errors; the GPU sums in a different order:
// per lane, then per block, then over blocks), as in test_gemm.cpp.
#pragma once

#include <cuda_bf16.h>

#include <string>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/check.h"
#include "backend/cuda/partial_sums.h"
#include "core/half.h"
#include "cuda_test_util.h"

namespace pgolf::test {

constexpr double kBf16Bound = 2.0;
constexpr double kF32Bound = 4.0;

inline std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

inline std::vector<float> rounded_bf16(std::vector<float> v) {
  for (float& x : v) x = round_to_bf16(x);
  return v;
}

// fp32 values near `center` (parameters such as scales and gates), any value.
inline std::vector<float> params_near(size_t n, Rng& rng, double center, double spread) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(center + spread * rng.normal());
  return v;
}

inline std::vector<float> download_f32(const cuda::DeviceBuffer<float>& b) { return b.download(); }

inline void sync_device() { PG_CUDA_CHECK(cudaDeviceSynchronize()); }

// The workspace the reduction ops need, generously sized for the test shapes.
struct TestWorkspace {
  cuda::DeviceBuffer<float> buffer;
  cuda::ReduceWorkspace ws;
  explicit TestWorkspace(size_t floats) : buffer(floats, "test reduction workspace") {
    buffer.fill_bytes(0xFF);
    ws.data = buffer.data();
    ws.floats = floats;
  }
};

}  // namespace pgolf::test
