#include "backend/cpu/fake_quant.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/parallel.h"

namespace pgolf::cpu {

template <typename T>
void fake_quant_int6_rows(const T* w, T* out, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (parallel_worth(rows * cols))
  for (int64_t r = 0; r < rows; ++r) {
    const T* wr = w + r * cols;
    float row_max = 0.0f;
    for (int64_t j = 0; j < cols; ++j) row_max = std::max(row_max, std::fabs(static_cast<float>(wr[j])));
    const float scale = std::max(row_max / 31.0f, 1.0f / 31.0f);
    for (int64_t j = 0; j < cols; ++j) {
      // std::nearbyint rounds half to even in the default rounding mode, as torch.round.
      const float q = std::clamp(std::nearbyint(static_cast<float>(wr[j]) / scale), -32.0f, 31.0f);
      out[r * cols + j] = static_cast<T>(q * scale);
    }
  }
}

template void fake_quant_int6_rows<float>(const float*, float*, int64_t, int64_t);
template void fake_quant_int6_rows<double>(const double*, double*, int64_t, int64_t);

}  // namespace pgolf::cpu
