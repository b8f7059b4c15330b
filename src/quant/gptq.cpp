#include "quant/gptq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/half.h"

extern "C" {
// LAPACK (column-major; OpenBLAS ships it).
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
}

namespace pgolf {

namespace {

// Upper Cholesky factor U (row-major, H^-1 = Uᵀ U) of the inverse of symmetric positive definite H
// (row-major n x n). The factorizations run in fp64; the reference's fp32 ones differ from these by
// rounding only, which moves codes only at exact rounding ties.
std::vector<double> upper_cholesky_of_inverse(std::vector<double> h, int n, const std::string& name) {
  int info = 0;
  const char lower = 'L';
  // A symmetric row-major matrix reads the same in column-major order.
  dpotrf_(&lower, &n, h.data(), &n, &info);
  PG_CHECK(info == 0, "GPTQ '{}': the damped Hessian is not positive definite (LAPACK dpotrf info {})", name, info);
  dpotri_(&lower, &n, h.data(), &n, &info);
  PG_CHECK(info == 0, "GPTQ '{}': inverting the Hessian failed (LAPACK dpotri info {})", name, info);
  // The inverse is in the column-major lower triangle = the row-major upper triangle; mirror it.
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) h[static_cast<size_t>(j) * n + i] = h[static_cast<size_t>(i) * n + j];
  dpotrf_(&lower, &n, h.data(), &n, &info);
  PG_CHECK(info == 0, "GPTQ '{}': the inverse Hessian is not positive definite (LAPACK dpotrf info {})", name, info);
  // Column-major lower L (H^-1 = L Lᵀ) read row-major is Lᵀ = U; clear the other triangle.
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) h[static_cast<size_t>(i) * n + j] = 0.0;
  return h;
}

// Unbiased standard deviation of each row, rounded to fp32 (torch.std(dim=1) of an fp32 tensor).
std::vector<float> row_std(std::span<const float> w, int64_t rows, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = w.data() + r * cols;
    double mean = 0.0;
    for (int64_t j = 0; j < cols; ++j) mean += x[j];
    mean /= static_cast<double>(cols);
    double ss = 0.0;
    for (int64_t j = 0; j < cols; ++j) ss += (x[j] - mean) * (x[j] - mean);
    out[r] = cols > 1 ? static_cast<float>(std::sqrt(ss / static_cast<double>(cols - 1))) : NAN;
  }
  return out;
}

}  // namespace

ScaledCodes quantize_gptq(std::span<const float> w, const Shape& shape, std::span<const float> hessian,
                          const GptqOptions& options, const std::string& name) {
  PG_CHECK(shape.size() == 2, "GPTQ '{}': expected a matrix, got shape {}", name, shape_str(shape));
  const int64_t rows = shape[0], cols = shape[1];
  PG_CHECK(static_cast<int64_t>(hessian.size()) == cols * cols,
           "GPTQ '{}': the Hessian has {} values, expected {} x {} for a weight of shape {}", name, hessian.size(),
           cols, cols, shape_str(shape));
  const int cr = options.clip_range;

  // Hessian in fp32 as the reference holds it: dead columns, then damping (fp32 mean of the diagonal).
  std::vector<float> h(hessian.begin(), hessian.end());
  std::vector<bool> dead(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    if (h[j * cols + j] == 0.0f) dead[j] = true, h[j * cols + j] = 1.0f;
  double diag_sum = 0.0;
  for (int64_t j = 0; j < cols; ++j) diag_sum += h[j * cols + j];
  const float damp = static_cast<float>(options.damp) * static_cast<float>(diag_sum / static_cast<double>(cols));
  for (int64_t j = 0; j < cols; ++j) h[j * cols + j] += damp;

  // Column order: descending diagonal (stable among equal values).
  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return h[a * cols + a] > h[b * cols + b]; });
  std::vector<double> hp(static_cast<size_t>(cols * cols));
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) hp[i * cols + j] = h[perm[i] * cols + perm[j]];
  const std::vector<double> u64 = upper_cholesky_of_inverse(std::move(hp), static_cast<int>(cols), name);
  std::vector<float> u(u64.begin(), u64.end());  // Hinv, fp32 like the reference's

  // SD-clip scales from the original rows, fp32 arithmetic then fp16.
  const auto stdev = row_std(w, rows, cols);
  std::vector<float> scale(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    scale[r] = round_to_f16(
        std::max(static_cast<float>(options.clip_sigmas) * stdev[r] / static_cast<float>(cr), 1e-10f));

  // Work on the permuted weights transposed, wt[k][r] = W[r, perm[k]], so that a column is contiguous.
  std::vector<float> wt(static_cast<size_t>(rows * cols));
  for (int64_t k = 0; k < cols; ++k)
    for (int64_t r = 0; r < rows; ++r) wt[k * rows + r] = dead[perm[k]] ? 0.0f : w[r * cols + perm[k]];

  std::vector<int8_t> qt(static_cast<size_t>(rows * cols));
  const int64_t bs = options.block_size;
  std::vector<float> err(static_cast<size_t>(bs * rows));  // err[j][r] of the current block
  std::vector<float> update;
  for (int64_t i1 = 0; i1 < cols; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, cols);
    for (int64_t j = i1; j < i2; ++j) {
      float* col = wt.data() + j * rows;
      const float d = u[j * cols + j];
      float* e = err.data() + (j - i1) * rows;
      for (int64_t r = 0; r < rows; ++r) {
        qt[j * rows + r] = round_to_code(col[r] / scale[r], -cr, cr);
        e[r] = (col[r] - static_cast<float>(qt[j * rows + r]) * scale[r]) / d;
      }
      // W_block[:, j:] -= e ⊗ Hinv[j, j:i2]: the product rounded to fp32, then subtracted (as in PyTorch).
      for (int64_t k = j; k < i2; ++k) {
        const float hk = u[j * cols + k];
        float* target = wt.data() + k * rows;
        for (int64_t r = 0; r < rows; ++r) target[r] -= e[r] * hk;
      }
    }
    if (i2 < cols) {
      // W[:, i2:] -= Err @ Hinv[i1:i2, i2:]; in the transposed layout: wt[i2:] -= Hinv[i1:i2, i2:]ᵀ @ errᵀ.
      const int64_t later = cols - i2, nb = i2 - i1;
      update.assign(static_cast<size_t>(later * rows), 0.0f);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(later), static_cast<int>(rows),
                  static_cast<int>(nb), 1.0f, u.data() + i1 * cols + i2, static_cast<int>(cols), err.data(),
                  static_cast<int>(rows), 0.0f, update.data(), static_cast<int>(rows));
      float* target = wt.data() + i2 * rows;
      for (int64_t t = 0; t < later * rows; ++t) target[t] -= update[t];
    }
  }

  ScaledCodes out;
  out.codes.resize(static_cast<size_t>(rows * cols));
  for (int64_t k = 0; k < cols; ++k)
    for (int64_t r = 0; r < rows; ++r) out.codes[r * cols + perm[k]] = qt[k * rows + r];
  HostTensor s(DType::F16, {rows});
  auto* bits = reinterpret_cast<uint16_t*>(s.bytes.data());
  for (int64_t r = 0; r < rows; ++r) bits[r] = f32_to_f16_bits(scale[r]);
  out.scale = std::move(s);
  return out;
}

HessianAccumulator::HessianAccumulator(int64_t cols, int64_t batches_done)
    : cols_(cols), batches_(batches_done), sum_(static_cast<size_t>(cols * cols), 0.0f) {
  PG_CHECK(cols > 0, "HessianAccumulator: width {} must be positive", cols);
}

void HessianAccumulator::add(std::span<const float> x, int64_t rows) {
  PG_CHECK(static_cast<int64_t>(x.size()) == rows * cols_, "HessianAccumulator::add: {} values for [{}, {}]",
           x.size(), rows, cols_);
  if (rows == 0) return;
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(cols_), static_cast<int>(rows), 1.0f, x.data(),
              static_cast<int>(cols_), 1.0f, sum_.data(), static_cast<int>(cols_));
}

std::vector<float> HessianAccumulator::finalize() const {
  PG_CHECK(batches_ > 0, "HessianAccumulator::finalize: no calibration batch was finished (call end_batch())");
  std::vector<float> h(sum_.size());
  const float n = static_cast<float>(batches_);
  for (int64_t i = 0; i < cols_; ++i)
    for (int64_t j = i; j < cols_; ++j) h[i * cols_ + j] = h[j * cols_ + i] = sum_[i * cols_ + j] / n;
  return h;
}

void HessianSet::add(const std::string& weight_name, std::span<const float> x, int64_t rows, int64_t cols) {
  auto it = acc_.find(weight_name);
  if (it == acc_.end()) it = acc_.emplace(weight_name, HessianAccumulator(cols, batches_)).first;
  PG_CHECK(it->second.cols() == cols, "HessianSet: '{}' has width {}, earlier batches had {}", weight_name, cols,
           it->second.cols());
  it->second.add(x, rows);
}

void HessianSet::end_batch() {
  ++batches_;
  for (auto& [name, a] : acc_) a.end_batch();
}

TensorMap HessianSet::finalize() const {
  TensorMap out;
  for (auto& [name, a] : acc_) out.set("hessian/" + name, HostTensor::from<float>({a.cols(), a.cols()}, a.finalize()));
  return out;
}

}  // namespace pgolf
