// Helpers for the GPU tests: a fixture that requires a device, bf16 data on host and device,
// poisoned outputs, and the error comparison of ENGINEERING §4 (a low-precision result may differ
// from the fp64 reference by at most k times the error of a naive same-precision computation).
#pragma once

#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/device.h"
#include "core/half.h"
#include "core/rng.h"

namespace pgolf::test {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) FAIL() << "no CUDA device: the GPU tests need one";
  }
};

// n values drawn from N(0, scale²) and rounded to bf16 (so host and device hold the same numbers).
inline std::vector<float> random_bf16_values(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = round_to_bf16(static_cast<float>(scale * rng.normal()));
  return v;
}

inline std::vector<float> random_f32_values(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

inline cuda::DeviceBuffer<__nv_bfloat16> to_device_bf16(const std::vector<float>& values) {
  std::vector<__nv_bfloat16> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = f32_to_bf16_bits(values[i]);
    bits[i] = raw;
  }
  return cuda::DeviceBuffer<__nv_bfloat16>(bits, "test input");
}

inline std::vector<float> from_device_bf16(const cuda::DeviceBuffer<__nv_bfloat16>& buffer) {
  std::vector<__nv_bfloat16> bits = buffer.download();
  std::vector<float> values(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) values[i] = bf16_bits_to_f32(static_cast<__nv_bfloat16_raw>(bits[i]).x);
  return values;
}

// A device output filled with 0xFF bytes (NaN in bf16 and fp32), so unwritten elements show.
template <typename T>
cuda::DeviceBuffer<T> poisoned_buffer(size_t count) {
  cuda::DeviceBuffer<T> b(count, "test output");
  b.fill_bytes(0xFF);
  return b;
}

struct ErrorStats {
  double max_abs = 0.0;  // over finite elements
  double rel_l2 = 0.0;   // ‖got − ref‖ / ‖ref‖
  size_t non_finite = 0;
  size_t worst = 0;  // index of the largest finite error, else of the first non-finite element
};

template <typename Got>
ErrorStats error_stats(const std::vector<Got>& got, const std::vector<double>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  ErrorStats s;
  double diff2 = 0.0, ref2 = 0.0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!std::isfinite(g)) {
      if (s.non_finite++ == 0 && s.max_abs == 0.0) s.worst = i;
      continue;
    }
    const double d = std::abs(g - ref[i]);
    if (d > s.max_abs) s.max_abs = d, s.worst = i;
    diff2 += d * d;
    ref2 += ref[i] * ref[i];
  }
  s.rel_l2 = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
  return s;
}

// Every element written and finite, and max |got − ref| <= k · max |naive − ref|.
template <typename Got, typename Naive>
void expect_within_naive(const std::string& what, const std::vector<Got>& got, const std::vector<Naive>& naive,
                         const std::vector<double>& ref, double k) {
  const ErrorStats g = error_stats(got, ref), n = error_stats(naive, ref);
  ::testing::Test::RecordProperty(what + "_max_abs", std::to_string(g.max_abs));
  std::printf("    %-28s max|err| %.3e (naive %.3e, ratio %.2f, bound %.1f)  rel L2 %.3e (naive %.3e)\n",
              what.c_str(), g.max_abs, n.max_abs, n.max_abs > 0 ? g.max_abs / n.max_abs : 0.0, k, g.rel_l2,
              n.rel_l2);
  EXPECT_EQ(g.non_finite, 0u) << what << ": " << g.non_finite << " elements not written or not finite";
  if (g.max_abs > k * n.max_abs || g.non_finite > 0)
    std::printf("    %-28s worst element %zu: got %g, reference %g\n", what.c_str(), g.worst,
                static_cast<double>(got[g.worst]), ref[g.worst]);
  EXPECT_EQ(n.non_finite, 0u) << what << ": the naive reference is not finite";
  EXPECT_GT(n.max_abs, 0.0) << what << ": the naive computation is exact, the comparison proves nothing";
  EXPECT_LE(g.max_abs, k * n.max_abs) << what << ": max error " << g.max_abs << " exceeds " << k
                                      << " x the naive same-precision error " << n.max_abs;
}

}  // namespace pgolf::test
