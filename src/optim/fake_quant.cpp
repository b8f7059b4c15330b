#include "optim/fake_quant.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "optim/update_math.h"

namespace pgolf::optim {

void fake_quantize_rows(std::span<const float> w, int64_t rows, int64_t cols, int bits, std::span<float> out) {
  PG_CHECK(rows >= 0 && cols >= 0 && static_cast<int64_t>(w.size()) == rows * cols && out.size() == w.size(),
           "fake_quantize_rows: {} values in, {} out, for [{}, {}]", w.size(), out.size(), rows, cols);
  PG_CHECK(bits >= 2 && bits <= 8, "qat_bits must be in 2..8, got {}", bits);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float qmin = -qmax - 1.0f;
  const float min_scale = 1.0f / qmax;
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w.data() + r * cols;
    float row_max = 0.0f;
    for (int64_t j = 0; j < cols; ++j) row_max = std::max(row_max, std::fabs(row[j]));
    const float scale = std::max(row_max / qmax, min_scale);
    for (int64_t j = 0; j < cols; ++j) out[r * cols + j] = fake_quant_value(row[j], scale, qmin, qmax);
  }
}

}  // namespace pgolf::optim
