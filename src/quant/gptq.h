// Full GPTQ with SD-clip scales (#1530 / s1560, from #1394; SPEC 5.7), and the Hessian accumulator
// that a calibration forward feeds.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "quant/rowwise.h"

namespace pgolf {

struct GptqOptions {
  int clip_range = 31;        // 2^(bits-1) - 1: int6 -> 31, int8 -> 127; codes in [-clip_range, clip_range]
  double clip_sigmas = 12.85;  // k of the SD-clip: scale_r = fp16(max(k * std(w_r) / clip_range, 1e-10))
  int block_size = 128;
  double damp = 0.01;  // H += damp * mean(diag H) * I
};

// Quantizes W [rows, cols] (row-major fp32) given the Hessian H [cols, cols] of its layer inputs:
// dead columns (H_jj = 0) get H_jj = 1 and W[:, j] = 0; damping; columns in descending diag(H) order;
// U = upper Cholesky factor of H^-1; per column: q = clamp(round(w / s)), e = (w - q s) / U_jj, the
// rest of the block -= e U_j,; after each block the later columns -= E U[block, later]. Codes are returned
// in the original column order with fp16 per-row scales. Throws if H is not positive definite.
ScaledCodes quantize_gptq(std::span<const float> w, const Shape& shape, std::span<const float> hessian,
                          const GptqOptions& options, const std::string& name);

// H = (sum over calibration batches of Xᵀ X) / batches for one layer input of width `cols`
// (SPEC 5.7: fp32 sums; a looped layer adds each of its passes; the division is by batch count).
class HessianAccumulator {
 public:
  // `batches_done`: calibration batches already finished when this layer is first seen.
  explicit HessianAccumulator(int64_t cols, int64_t batches_done = 0);
  // Adds Xᵀ X for layer inputs X [rows, cols] (row-major).
  void add(std::span<const float> x, int64_t rows);
  void end_batch() { ++batches_; }
  int64_t batches() const { return batches_; }
  int64_t cols() const { return cols_; }
  // [cols, cols] row-major: the sum divided by the number of finished batches (at least one).
  std::vector<float> finalize() const;

 private:
  int64_t cols_;
  int64_t batches_ = 0;
  std::vector<float> sum_;  // upper triangle accumulated (symmetric rank-k updates), row-major
};

// The Hessians of a whole model, by weight name; `finalize()` gives the tensors `hessian/<weight name>`
// that `pgolf pack --hessians` reads.
class HessianSet {
 public:
  void add(const std::string& weight_name, std::span<const float> x, int64_t rows, int64_t cols);
  void end_batch();
  TensorMap finalize() const;

 private:
  std::map<std::string, HessianAccumulator> acc_;
  int64_t batches_ = 0;
};

}  // namespace pgolf
