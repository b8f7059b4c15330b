// The elementwise optimizer kernels against their CPU twins (src/optim) on fresh random data. Each
// kernel runs update_math.h's rule with the same fp32/fp64 operations and roundings as the CPU (the
// rules spell out every rounding, so nvcc's fused multiply-adds cannot change them), hence the
// tolerance is zero: the GPU must reproduce the CPU's bits. The gradient norm is an fp64 sum in
// another order, bounded by the sums' rounding error.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "backend/cuda/averaging.h"
#include "backend/cuda/gpu_ema.h"
#include "backend/cuda/gpu_optimizer.h"
#include "backend/cuda/grad_clip.h"
#include "backend/cuda/lora.h"
#include "core/error.h"
#include "optim/averaging.h"
#include "optim/clip.h"
#include "optim/fake_quant.h"
#include "optim_test_util.h"

namespace pgolf::test {
namespace {

class OptimKernels : public CudaTest {};

// AdamW over tensors of awkward sizes (a 0-d scalar, lengths that straddle the 4096-value chunks,
// both groups interleaved, a Muon-group matrix in between that the AdamW launch must not touch),
// three steps with different lr scales against the CPU Optimizer: parameters and both moments.
TEST_F(OptimKernels, AdamWMatchesTheCpuBitForBit) {
  const ParamLayout layout({{"emb", {300, 37}, ParamGroup::Embed, InitKind::Zeros},
                            {"s0", {}, ParamGroup::Scalar, InitKind::Zeros},
                            {"s1", {5}, ParamGroup::Scalar, InitKind::Zeros},
                            {"emb2", {8193}, ParamGroup::Embed, InitKind::Zeros},
                            {"s2", {2, 4099}, ParamGroup::Scalar, InitKind::Zeros}});
  optim::OptimizerConfig config;
  config.embed = {0.035, 0.9, 0.95, 1e-8, 0.04};
  config.scalar = {0.025, 0.9, 0.95, 1e-8, 0.01};
  Rng rng(101);
  ParamSet<float> params(layout);
  fill_normal(params.all(), rng, 0.5);
  cuda::DeviceBuffer<float> device_params = upload(params.all());
  optim::Optimizer cpu(layout, config);
  cuda::GpuOptimizer gpu(layout, config, 0.0);
  const double lr_scales[] = {1.0, 0.55, 0.125};
  for (int64_t k = 0; k < 3; ++k) {
    ParamSet<float> grads(layout);
    fill_normal(grads.all(), rng, 0.02);
    cuda::DeviceBuffer<float> device_grads = upload(grads.all());
    gpu.step(device_params.data(), device_grads.data(), k, lr_scales[k], 0.95, nullptr);
    cpu.step(params, grads, k, lr_scales[k], 0.95);
  }
  EXPECT_EQ(bit_mismatches(download_params(layout, device_params).all(), params.all()), 0u);
  const TensorMap want = cpu.state_tensors(), got = gpu.state_tensors();
  ASSERT_EQ(got.names(), want.names());
  for (const std::string& name : want.names()) {
    if (name == "optim/step") {
      EXPECT_EQ(got.get(name).as<int64_t>()[0], 3);
      continue;
    }
    EXPECT_EQ(bit_mismatches(got.get(name).as<float>(), want.get(name).as<float>()), 0u) << name;
  }
}

// EMA over a length that is not a multiple of 4 (the vector loop and the tail), five updates.
// LoRA TTT's AdamW over the first rows of each adapter segment (lora_rows_adamw), and the bf16 copy of
// those rows (lora_rows_to_bf16), against the CPU rule value by value: with the vector path (segments
// whose offset and row size are multiples of 4, four values a thread) and without it, with and without a
// first moment. One segment is left unaligned (offset 2) so that the scalar walk runs beside the
// vector one in a launch. Values past the rows stay as they were.
TEST_F(OptimKernels, LoraRowAdamWMatchesTheCpuBitForBit) {
  struct Restore {
    bool was = cuda::lora_vector_access();
    ~Restore() { cuda::set_lora_vector_access(was); }
  } restore;
  const std::vector<LoraRowSegment> segments = {{0, 768}, {768 * 6, 96}, {768 * 6 + 96 * 6 + 2, 36}};
  const int64_t total = 768 * 6 + 96 * 6 + 2 + 36 * 6 + 5, rows = 5, max_per_row = 768;
  Rng rng(77);
  std::vector<float> p0(static_cast<size_t>(total)), g(p0.size()), m0(p0.size()), v0(p0.size());
  fill_normal(p0, rng, 0.5);
  fill_normal(g, rng, 1e-3);
  fill_normal(m0, rng, 1e-3);
  for (float& x : v0) x = static_cast<float>(1e-6 * std::fabs(rng.normal()));
  const optim::AdamCoeffs c = optim::adam_coeffs(1e-4, 0.9, 0.999, 0.5, 1e-10, 3);
  for (const bool with_m : {true, false}) {
    // The CPU rule over the rows of every segment.
    std::vector<float> p = p0, m = m0, v = v0;
    for (const LoraRowSegment& seg : segments)
      for (int64_t k = seg.offset; k < seg.offset + rows * seg.per_row; ++k) {
        float mk = with_m ? m[static_cast<size_t>(k)] : 0.f;
        optim::adamw_update(p[static_cast<size_t>(k)], g[static_cast<size_t>(k)], mk, v[static_cast<size_t>(k)], c);
        if (with_m) m[static_cast<size_t>(k)] = mk;
      }
    for (const bool vec : {true, false}) {
      cuda::set_lora_vector_access(vec);
      cuda::DeviceBuffer<float> dp(p0), dg(g), dm(m0), dv(v0);
      cuda::DeviceBuffer<__nv_bfloat16> d16(p0.size());
      PG_CUDA_CHECK(cudaMemset(d16.data(), 0xff, p0.size() * 2));  // NaN: must be overwritten in the rows
      cuda::DeviceBuffer<LoraRowSegment> dseg(segments);
      cuda::DeviceBuffer<optim::AdamCoeffs> dc(std::vector<optim::AdamCoeffs>{c});
      cuda::lora_rows_adamw(dp.data(), dg.data(), with_m ? dm.data() : nullptr, dv.data(), d16.data(), dc.data(),
                            dseg.data(), static_cast<int>(segments.size()), rows, max_per_row, nullptr);
      PG_CUDA_CHECK(cudaDeviceSynchronize());
      const std::string what = std::string(vec ? "vector" : "scalar") + (with_m ? ", first moment" : ", no first moment");
      EXPECT_EQ(bit_mismatches(dp.download(), p), 0u) << "p, " << what;
      EXPECT_EQ(bit_mismatches(dv.download(), v), 0u) << "v, " << what;
      if (with_m) {
        EXPECT_EQ(bit_mismatches(dm.download(), m), 0u) << "m, " << what;
      }
      // The bf16 copies: written by the step, and by the cast pass from the new values.
      std::vector<uint16_t> bits(p0.size());
      cuda::DeviceBuffer<__nv_bfloat16> cast(p0.size());
      PG_CUDA_CHECK(cudaMemset(cast.data(), 0xff, p0.size() * 2));
      cuda::lora_rows_to_bf16(dp.data(), cast.data(), dseg.data(), static_cast<int>(segments.size()), rows, max_per_row,
                              nullptr);
      for (cuda::DeviceBuffer<__nv_bfloat16>* copy : {&d16, &cast}) {
        PG_CUDA_CHECK(cudaMemcpy(bits.data(), copy->data(), bits.size() * 2, cudaMemcpyDeviceToHost));
        size_t wrong = 0;
        std::vector<bool> in_rows(p0.size(), false);
        for (const LoraRowSegment& seg : segments)
          for (int64_t k = seg.offset; k < seg.offset + rows * seg.per_row; ++k) in_rows[static_cast<size_t>(k)] = true;
        for (size_t k = 0; k < bits.size(); ++k) {
          const uint16_t want = in_rows[k] ? f32_to_bf16_bits(p[k]) : uint16_t{0xffff};
          wrong += bits[k] != want ? 1 : 0;
        }
        EXPECT_EQ(wrong, 0u) << "bf16 copies, " << what << (copy == &d16 ? " (the step's)" : " (the cast's)");
      }
    }
  }
}

TEST_F(OptimKernels, EmaMatchesTheCpuBitForBitAndSavesTheSameTensors) {
  const ParamLayout layout(
      {{"a", {1000, 1001}, ParamGroup::Matrix, InitKind::Zeros}, {"b", {3}, ParamGroup::Scalar, InitKind::Zeros}});
  Rng rng(202);
  ParamSet<float> theta(layout);
  fill_normal(theta.all(), rng, 1.0);
  cuda::DeviceBuffer<float> device_theta = upload(theta.all());
  optim::Ema cpu(theta, 0.997);
  cuda::GpuEma gpu(layout, device_theta.data(), 0.997);
  for (int k = 0; k < 5; ++k) {
    fill_normal(theta.all(), rng, 1.0);
    device_theta.upload(std::vector<float>(theta.all().begin(), theta.all().end()));
    gpu.update(device_theta.data(), nullptr);
    cpu.update(theta);
  }
  const TensorMap want = cpu.state_tensors(), got = gpu.state_tensors();
  ASSERT_EQ(got.names(), want.names());
  for (const std::string& name : want.names())
    EXPECT_EQ(bit_mismatches(got.get(name).as<float>(), want.get(name).as<float>()), 0u) << name;
  gpu.copy_to(device_theta.data(), nullptr);
  EXPECT_EQ(bit_mismatches(download_params(layout, device_theta).all(), cpu.average().all()), 0u);
}

// The global norm: both sides sum the n squares in fp64, in different orders; each order's error is
// at most (n − 1)·2⁻⁵³ of the sum (recursive summation of positive terms), so the norms agree to
// n·2⁻⁵³ relative. The coefficient is then computed from the same fp32 norm by the same rule.
TEST_F(OptimKernels, GradientNormAndClipCoefficientMatchTheCpu) {
  const int64_t n = 1'000'003;
  Rng rng(303);
  std::vector<float> g(n);
  fill_normal(g, rng, 1e-3);
  cuda::DeviceBuffer<float> device_g = upload(g);
  cuda::GradClip clip(0.3);
  clip.enqueue(device_g.data(), n, nullptr);
  const double want = optim::global_l2_norm(g);
  const double got = clip.norm(nullptr);
  EXPECT_NEAR(got, want, static_cast<double>(n) * std::ldexp(1.0, -53) * want);
  cuda::DeviceBuffer<cuda::GradClipState> state(1);
  PG_CUDA_CHECK(cudaMemcpy(state.data(), clip.state(), sizeof(cuda::GradClipState), cudaMemcpyDeviceToDevice));
  const float coefficient = state.download()[0].coefficient;
  EXPECT_EQ(coefficient, optim::clip_coefficient(want, 0.3));
  EXPECT_LT(coefficient, 1.0f);                           // sqrt(n)·1e-3 ≈ 1 > 0.3: clipping is active
  EXPECT_EQ(bit_mismatches(device_g.download(), g), 0u);  // the gradients are not rewritten

  // Small gradients are not scaled; a NaN gradient is reported when the norm is read.
  for (float& x : g) x *= 1e-3f;
  device_g.upload(g);
  clip.enqueue(device_g.data(), n, nullptr);
  PG_CUDA_CHECK(cudaMemcpy(state.data(), clip.state(), sizeof(cuda::GradClipState), cudaMemcpyDeviceToDevice));
  EXPECT_EQ(state.download()[0].coefficient, 1.0f);
  g[n / 2] = std::numeric_limits<float>::quiet_NaN();
  device_g.upload(g);
  clip.enqueue(device_g.data(), n, nullptr);
  EXPECT_THROW(clip.norm(nullptr), Error);
}

// Per-row int6 (and int4) fake quantization, bf16 output = the CPU's fp32 result rounded to bf16.
// Rows of very different magnitudes take both scale branches (row max / qmax, and the 1 / qmax floor).
TEST_F(OptimKernels, FakeQuantMatchesTheCpuRoundedToBf16) {
  const int64_t rows = 77, cols = 200;
  Rng rng(404);
  std::vector<float> w(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) w[r * cols + j] = static_cast<float>(std::pow(10.0, r % 4 - 2) * rng.normal());
  cuda::DeviceBuffer<float> device_w = upload(w);
  for (int bits : {6, 4}) {
    std::vector<float> cpu(w.size());
    optim::fake_quantize_rows(w, rows, cols, bits, cpu);
    auto out = poisoned_buffer<__nv_bfloat16>(w.size());
    cuda::fake_quantize_rows_bf16(device_w.data(), rows, cols, bits, out.data(), nullptr);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> want(cpu.size());
    for (size_t i = 0; i < cpu.size(); ++i) want[i] = round_to_bf16(cpu[i]);
    EXPECT_EQ(bit_mismatches(from_device_bf16(out), want), 0u) << bits << " bits";
    size_t zeros = 0;
    for (float x : want) zeros += x == 0.0f;
    EXPECT_LT(zeros, want.size() / 2) << "the data should quantize to mostly non-zero codes";
  }
}

}  // namespace
}  // namespace pgolf::test
