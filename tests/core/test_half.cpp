#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/half.h"

using namespace pgolf;

// Reference rounding through double: the nearest fp16 value, ties to even, found by search over
// all 65,536 fp16 bit patterns' values (exact in double).
static uint16_t f16_reference(float x) {
  double v = x;
  uint16_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (uint32_t b = 0; b < 0x7c00u; ++b) {  // finite non-negative fp16 values
    double h = f16_bits_to_f32(static_cast<uint16_t>(b));
    double err = std::fabs(h - std::fabs(v));
    if (err < best_err || (err == best_err && (b & 1u) == 0)) {
      best_err = err;
      best = static_cast<uint16_t>(b);
    }
  }
  // Values beyond the largest finite fp16 + half an ulp round to infinity.
  if (std::fabs(v) >= 65520.0) best = 0x7c00u;
  return static_cast<uint16_t>(best | (std::signbit(x) ? 0x8000u : 0u));
}

TEST(Half, F16RoundTripOfEveryFiniteValue) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    uint16_t h = static_cast<uint16_t>(b);
    if ((h & 0x7c00u) == 0x7c00u) continue;  // inf/nan handled below
    EXPECT_EQ(f32_to_f16_bits(f16_bits_to_f32(h)), h) << "bits " << b;
  }
}

TEST(Half, F16RoundsToNearestEven) {
  const float probes[] = {1e-8f, 2.9802322e-8f, 5.9604645e-8f, 8.940697e-8f, 6.1e-5f, 6.097555e-5f, 6.1035156e-5f,
                          0.1f, 1.0f / 31.0f, 0.333333f, 1.0009766f, 1.00048828125f, 1.000732421875f,
                          2047.5f, 2048.5f, 65504.0f, 65519.0f, 65520.0f, 1e6f, 3.14159f, 0.0f, -0.0f, -0.1f};
  for (float p : probes) EXPECT_EQ(f32_to_f16_bits(p), f16_reference(p)) << p;
}

TEST(Half, F16SpecialValues) {
  EXPECT_EQ(f32_to_f16_bits(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_EQ(f32_to_f16_bits(-std::numeric_limits<float>::infinity()), 0xfc00u);
  EXPECT_TRUE(std::isnan(f16_bits_to_f32(f32_to_f16_bits(std::nanf("")))));
}

TEST(Half, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16_bits(1.0f), 0x3f80u);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(f32_to_bf16_bits(1.00390625f), 0x3f80u);
  // 1 + 3*2^-8 is halfway between 1+2^-7 and 1+2^-6: ties to even (1 + 2^-6 -> mantissa 2).
  EXPECT_EQ(f32_to_bf16_bits(1.01171875f), 0x3f82u);
  EXPECT_FLOAT_EQ(round_to_bf16(3.0f), 3.0f);
  EXPECT_TRUE(std::isnan(round_to_bf16(std::nanf(""))));
}
