// The warpgroup-MMA building blocks (backend/cuda/wgmma.cuh) on plain 64x64x64 bf16 products, B in
// both storage orders the attention kernels use: [n][k] (K-major, K in Q·Kᵀ) and [k][n] (MN-major, V
// in P·V), A from registers or from shared memory in both orders ([m][k] and [k][m]). A wrong descriptor, swizzle or fragment mapping moves or mixes whole blocks of the result,
// far outside the bound. Bound (ENGINEERING §4): within 2x the error of a sequential fp32 sum of the
// same bf16 products, against fp64.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "wgmma_product.h"

namespace pgolf::test {
namespace {

class WgmmaTest : public CudaTest {};

// A in registers (a_in_registers: a [m][k], ldmatrix) or read by descriptor from a [m][k]
// (a_rows_are_m, K-major) or a [k][m] (MN-major); B [n][k] (b_rows_are_n) or [k][n].
void check_product(bool a_in_registers, bool a_rows_are_m, bool b_rows_are_n, uint64_t seed) {
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
        const float av = a_rows_are_m ? a[i * n + k] : a[k * n + i];
        const float bv = b_rows_are_n ? b[j * n + k] : b[k * n + j];
        exact += double(av) * bv;
        sequential += av * bv;
      }
      ref[i * n + j] = exact, naive[i * n + j] = sequential;
    }
  }
  auto a_dev = to_device_bf16(a), b_dev = to_device_bf16(b);
  auto c_dev = poisoned_buffer<float>(n * n);
  if (a_in_registers) wgmma_product_device(a_dev.data(), b_dev.data(), c_dev.data(), b_rows_are_n);
  else wgmma_product_shared_a_device(a_dev.data(), b_dev.data(), c_dev.data(), a_rows_are_m, b_rows_are_n);
  const std::string label = std::string(a_in_registers ? "registers_" : "shared_") + (a_rows_are_m ? "a" : "aT") +
                            (b_rows_are_n ? "_bT" : "_b");
  expect_within_naive(label, c_dev.download(), naive, ref, 2.0);
}

TEST_F(WgmmaTest, ProductWithKMajorB) { check_product(true, true, true, 201); }
TEST_F(WgmmaTest, ProductWithMNMajorB) { check_product(true, true, false, 202); }
// A from shared memory: K-major A with K-major B is Sᵀ = K·Qᵀ of the backward, MN-major A with
// MN-major B its dQ = dS·K; the mixed orders separate an A error from a B error.
TEST_F(WgmmaTest, SharedAKMajorWithKMajorB) { check_product(false, true, true, 203); }
TEST_F(WgmmaTest, SharedAMNMajorWithMNMajorB) { check_product(false, false, false, 204); }
TEST_F(WgmmaTest, SharedAKMajorWithMNMajorB) { check_product(false, true, false, 205); }
TEST_F(WgmmaTest, SharedAMNMajorWithKMajorB) { check_product(false, false, true, 206); }

}  // namespace
}  // namespace pgolf::test
