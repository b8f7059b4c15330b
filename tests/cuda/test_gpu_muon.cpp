// Muon on the device against the CPU Muon (src/optim/muon.cpp with its bf16 Newton–Schulz emulation).
//
// 1. Monomial gradients (one non-zero per row and per column of the wide orientation): every product
//    of Newton–Schulz then has a single non-zero term, exact in fp32 whatever the accumulation order,
//    so the GPU must reproduce the CPU's bits through three full steps — momentum, row and Frobenius
//    normalisation, every bf16 rounding point of both forms, transposition of tall matrices and bank
//    slices, batching of equal shapes, zero-padding of rare shapes into a larger batch (e into the
//    [64, 192] batch, bank3 into the [64, 128] one), shape scales, weight decay — of matrices and
//    banks together.
// 2. Random gradients: the products' fp32 sums differ in order from OpenBLAS's, which moves some bf16
//    roundings, so the bound is ENGINEERING §4's: the GPU's distance to an fp64 Newton–Schulz is at
//    most k = 2 times the CPU emulation's. Both are the same sequence of bf16-rounded ops with fp32
//    accumulation, so their errors have the same distribution; 2 leaves room for the spread of the
//    maximum over a tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cuda/gpu_optimizer.h"
#include "optim/clip.h"
#include "optim/newton_schulz.h"
#include "optim_test_util.h"

namespace pgolf::test {
namespace {

ParamSpec spec(const std::string& name, Shape shape, ParamGroup group) {
  return ParamSpec{name, std::move(shape), group, InitKind::Zeros};
}

struct MatrixShape {
  int64_t slices, rows, cols;
};

MatrixShape matrix_shape(const ParamSpec& s) {
  return s.shape.size() == 3 ? MatrixShape{s.shape[0], s.shape[1], s.shape[2]} : MatrixShape{1, s.shape[0], s.shape[1]};
}

// For each slice, the column (in the wide orientation) of each wide row's one non-zero.
std::vector<std::vector<int64_t>> monomial_pattern(const MatrixShape& m, Rng& rng) {
  const int64_t n = std::min(m.rows, m.cols), wide = std::max(m.rows, m.cols);
  std::vector<std::vector<int64_t>> out;
  for (int64_t s = 0; s < m.slices; ++s) {
    std::vector<int64_t> columns(wide);
    std::iota(columns.begin(), columns.end(), 0);
    for (int64_t i = wide - 1; i > 0; --i) std::swap(columns[i], columns[rng.below(static_cast<uint64_t>(i + 1))]);
    columns.resize(n);
    out.push_back(columns);
  }
  return out;
}

void fill_monomial(std::span<float> g, const MatrixShape& m, const std::vector<std::vector<int64_t>>& pattern,
                   Rng& rng) {
  std::fill(g.begin(), g.end(), 0.0f);
  const bool tall = m.rows > m.cols;
  for (int64_t s = 0; s < m.slices; ++s) {
    float* slice = g.data() + s * m.rows * m.cols;
    for (size_t i = 0; i < pattern[s].size(); ++i) {
      const int64_t wide_row = static_cast<int64_t>(i), wide_col = pattern[s][i];
      const int64_t r = tall ? wide_col : wide_row, c = tall ? wide_row : wide_col;
      slice[r * m.cols + c] = static_cast<float>(0.01 * rng.normal());
    }
  }
}

optim::OptimizerConfig muon_config(double lr, double wd, bool row_normalize) {
  optim::OptimizerConfig c;
  c.embed = {0.035, 0.9, 0.95, 1e-8, 0.04};
  c.scalar = {0.025, 0.9, 0.95, 1e-8, 0.04};
  c.matrix.lr = lr;
  c.matrix.weight_decay = wd;
  c.matrix.ns_steps = 5;
  c.matrix.row_normalize = row_normalize;
  c.matrix.numerics = optim::MuonNumerics::BF16;
  return c;
}

class GpuMuonMonomial : public CudaTest, public ::testing::WithParamInterface<bool> {};

TEST_P(GpuMuonMonomial, ThreeStepsReproduceTheCpuBits) {
  const bool row_normalize = GetParam();
  const ParamLayout layout({spec("emb", {10, 16}, ParamGroup::Embed), spec("a", {64, 192}, ParamGroup::Matrix),
                            spec("s", {7}, ParamGroup::Scalar), spec("b", {192, 64}, ParamGroup::Matrix),
                            spec("c", {64, 192}, ParamGroup::Matrix), spec("f", {64, 192}, ParamGroup::Matrix),
                            spec("d", {96, 96}, ParamGroup::Matrix), spec("e", {40, 24}, ParamGroup::Matrix),
                            spec("bank1", {3, 64, 128}, ParamGroup::Matrix),
                            spec("bank2", {2, 128, 64}, ParamGroup::Matrix),
                            spec("bank3", {2, 32, 32}, ParamGroup::Matrix)});
  const optim::OptimizerConfig config = muon_config(0.025, 0.04, row_normalize);
  Rng rng(row_normalize ? 11 : 12);
  std::vector<std::vector<std::vector<int64_t>>> patterns(layout.size());
  for (size_t i = 0; i < layout.size(); ++i)
    if (layout.spec(i).group == ParamGroup::Matrix) patterns[i] = monomial_pattern(matrix_shape(layout.spec(i)), rng);

  ParamSet<float> params(layout);
  fill_normal(params.all(), rng, 0.05);
  cuda::DeviceBuffer<float> device_params = upload(params.all());
  optim::Optimizer cpu(layout, config);
  cuda::GpuOptimizer gpu(layout, config, 0.3);
  const double lr_scales[] = {1.0, 0.7, 0.3}, momenta[] = {0.92, 0.95, 0.99};
  for (int64_t k = 0; k < 3; ++k) {
    ParamSet<float> grads(layout);
    for (size_t i = 0; i < layout.size(); ++i) {
      if (layout.spec(i).group == ParamGroup::Matrix)
        fill_monomial(grads[i], matrix_shape(layout.spec(i)), patterns[i], rng);
      else
        fill_normal(grads[i], rng, 0.01);
    }
    cuda::DeviceBuffer<float> device_grads = upload(grads.all());
    gpu.step(device_params.data(), device_grads.data(), k, lr_scales[k], momenta[k], nullptr);
    optim::clip_grad_norm(grads.all(), 0.3);
    cpu.step(params, grads, k, lr_scales[k], momenta[k]);
  }
  const ParamSet<float> got = download_params(layout, device_params);
  for (size_t i = 0; i < layout.size(); ++i) EXPECT_EQ(bit_mismatches(got[i], params[i]), 0u) << layout.spec(i).name;
  const TensorMap want_state = cpu.state_tensors(), got_state = gpu.state_tensors();
  ASSERT_EQ(got_state.names(), want_state.names());
  for (const std::string& name : want_state.names()) {
    if (name == "optim/step") continue;
    EXPECT_EQ(bit_mismatches(got_state.get(name).as<float>(), want_state.get(name).as<float>()), 0u) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(RowNormalize, GpuMuonMonomial, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "RowNormalized" : "Plain"; });

// Newton–Schulz in fp64 of one matrix [rows, cols]: normalised, wide orientation, 5 iterations, back.
std::vector<double> newton_schulz_fp64(std::span<const float> g, int64_t rows, int64_t cols) {
  const bool tall = rows > cols;
  const int64_t n = std::min(rows, cols), m = std::max(rows, cols);
  std::vector<double> x(n * m), a(n * n), b(n * n), bx(n * m);
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      x[i * m + j] = tall ? g[j * cols + i] : g[i * cols + j];
      sum_sq += x[i * m + j] * x[i * m + j];
    }
  const double denom = std::sqrt(sum_sq) + optim::kNsEps;
  for (double& v : x) v /= denom;
  for (int it = 0; it < 5; ++it) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < m; ++k) s += x[i * m + k] * x[j * m + k];
        a[i * n + j] = s;
      }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < n; ++k) s += a[i * n + k] * a[k * n + j];
        b[i * n + j] = optim::kNsB * a[i * n + j] + optim::kNsC * s;
      }
    std::fill(bx.begin(), bx.end(), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < n; ++k)
        for (int64_t j = 0; j < m; ++j) bx[i * m + j] += b[i * n + k] * x[k * m + j];
    for (int64_t i = 0; i < n * m; ++i) x[i] = optim::kNsA * x[i] + bx[i];
  }
  std::vector<double> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = tall ? x[c * m + r] : x[r * m + c];
  return out;
}

class GpuMuon : public CudaTest {};

// One step from zero parameters with lr 1, no decay and μ = 0 gives p = −scale · NS(g) (matrices: the
// scaled update rounded to bf16; banks: the scale in the fp32 step), so the parameters are the
// orthogonalised gradient. bf16-valued gradients make bf16(g) = g for both numerics.
TEST_F(GpuMuon, RandomGradientsStayWithinTwiceTheCpuEmulationsError) {
  const ParamLayout layout({spec("q", {128, 128}, ParamGroup::Matrix), spec("q2", {128, 128}, ParamGroup::Matrix),
                            spec("fc", {384, 128}, ParamGroup::Matrix), spec("proj", {128, 384}, ParamGroup::Matrix),
                            spec("small", {64, 32}, ParamGroup::Matrix),
                            spec("bank", {2, 128, 256}, ParamGroup::Matrix),
                            spec("bank_tall", {2, 256, 128}, ParamGroup::Matrix)});
  const optim::OptimizerConfig config = muon_config(1.0, 0.0, false);
  Rng rng(21);
  ParamSet<float> grads(layout);
  const std::vector<float> g = random_bf16_values(static_cast<size_t>(layout.total()), rng);
  std::copy(g.begin(), g.end(), grads.all().begin());

  ParamSet<float> cpu_params(layout);
  cpu_params.zero();
  optim::Optimizer cpu(layout, config);
  cpu.step(cpu_params, grads, 0, 1.0, 0.0);

  cuda::DeviceBuffer<float> device_params(static_cast<size_t>(layout.total()));
  device_params.fill_bytes(0);
  cuda::DeviceBuffer<float> device_grads = upload(grads.all());
  cuda::GpuOptimizer gpu(layout, config, 0.0);
  gpu.step(device_params.data(), device_grads.data(), 0, 1.0, 0.0, nullptr);
  const ParamSet<float> gpu_params = download_params(layout, device_params);

  for (size_t i = 0; i < layout.size(); ++i) {
    const MatrixShape m = matrix_shape(layout.spec(i));
    const double scale = std::sqrt(std::max(1.0, static_cast<double>(m.rows) / static_cast<double>(m.cols)));
    std::vector<double> ref;
    for (int64_t s = 0; s < m.slices; ++s) {
      const std::vector<double> x =
          newton_schulz_fp64(grads[i].subspan(s * m.rows * m.cols, m.rows * m.cols), m.rows, m.cols);
      for (double v : x) ref.push_back(-scale * v);
    }
    const std::vector<float> got(gpu_params[i].begin(), gpu_params[i].end());
    const std::vector<float> naive(cpu_params[i].begin(), cpu_params[i].end());
    expect_within_naive(layout.spec(i).name, got, naive, ref, 2.0);
  }
}

}  // namespace
}  // namespace pgolf::test
