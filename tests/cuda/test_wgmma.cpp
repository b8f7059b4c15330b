// The warpgroup-MMA building blocks (backend/cuda/wgmma.cuh) on plain 64x64x64 bf16 products, B in
// both storage orders the attention kernel uses: [n][k] (K-major, K in Q·Kᵀ) and [k][n] (MN-major, V
// in P·V). A wrong descriptor, swizzle or fragment mapping moves or mixes whole blocks of the result,
// far outside the bound. Bound (ENGINEERING §4): within 2x the error of a sequential fp32 sum of the
// same bf16 products, against fp64.
#include <gtest/gtest.h>

#include <vector>

#include "cuda_test_util.h"
#include "wgmma_product.h"

namespace pgolf::test {
namespace {

class WgmmaTest : public CudaTest {};

void check_product(bool b_rows_are_n, uint64_t seed) {
  constexpr int n = 64;
  Rng rng(seed);
  const std::vector<float> a = random_bf16_values(n * n, rng), b = random_bf16_values(n * n, rng);
  std::vector<double> ref(n * n);
  std::vector<float> naive(n * n);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      double exact = 0;
      float sequential = 0;
      for (int k = 0; k < n; ++k) {
        const float bv = b_rows_are_n ? b[j * n + k] : b[k * n + j];
        exact += double(a[i * n + k]) * bv;
        sequential += a[i * n + k] * bv;
      }
      ref[i * n + j] = exact, naive[i * n + j] = sequential;
    }
  }
  auto a_dev = to_device_bf16(a), b_dev = to_device_bf16(b);
  auto c_dev = poisoned_buffer<float>(n * n);
  wgmma_product_device(a_dev.data(), b_dev.data(), c_dev.data(), b_rows_are_n);
  expect_within_naive(b_rows_are_n ? "a_bT" : "a_b", c_dev.download(), naive, ref, 2.0);
}

TEST_F(WgmmaTest, ProductWithKMajorB) { check_product(true, 201); }
TEST_F(WgmmaTest, ProductWithMNMajorB) { check_product(false, 202); }

}  // namespace
}  // namespace pgolf::test
