#include "model/init.h"

#include <cmath>
#include <vector>

#include "backend/cpu/gemm.h"
#include "core/error.h"

namespace pgolf {

void orthogonal_init(double* out, int64_t rows, int64_t cols, double gain, Rng& rng) {
  const int64_t m = std::max(rows, cols), n = std::min(rows, cols);
  // q holds n vectors of length m, one per row: the columns of the tall [m, n] Gaussian matrix.
  std::vector<double> q(static_cast<size_t>(m * n));
  for (auto& x : q) x = rng.normal();
  std::vector<double> c(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    double* a = q.data() + j * m;
    // Two passes of classical Gram-Schmidt against the finished vectors (CGS2): c = Q a, a -= Qᵀ c.
    for (int pass = 0; pass < 2 && j > 0; ++pass) {
      cpu::gemm<double>(false, false, j, 1, m, 1.0, q.data(), m, a, 1, 0.0, c.data(), 1);
      cpu::gemm<double>(true, false, m, 1, j, -1.0, q.data(), m, c.data(), 1, 1.0, a, 1);
    }
    double norm = 0;
    for (int64_t i = 0; i < m; ++i) norm += a[i] * a[i];
    norm = std::sqrt(norm);
    PG_CHECK(norm > 1e-6, "orthogonal init: a Gaussian column of a {}x{} matrix came out dependent", rows, cols);
    // Dividing by the positive norm is the sign convention Q·sign(diag R).
    for (int64_t i = 0; i < m; ++i) a[i] /= norm;
  }
  // rows > cols: out = Q (columns orthonormal); rows <= cols: out = Qᵀ (rows orthonormal).
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      out[r * cols + k] = gain * (rows > cols ? q[k * m + r] : q[r * m + k]);
}

template <typename T>
void init_params(ParamSet<T>& params, uint64_t seed) {
  const Rng root(seed);
  for (size_t i = 0; i < params.layout().size(); ++i) {
    const ParamSpec& s = params.layout().spec(i);
    auto dst = params[i];
    Rng rng = root.fork(i);
    const int64_t last = s.shape.empty() ? 1 : s.shape.back();
    switch (s.init) {
      case InitKind::Zeros:
        for (auto& x : dst) x = T(0);
        break;
      case InitKind::Ones:
        for (auto& x : dst) x = T(1);
        break;
      case InitKind::Constant:
        for (auto& x : dst) x = static_cast<T>(s.init_value);
        break;
      case InitKind::Normal:
        for (auto& x : dst) x = static_cast<T>(rng.normal() * s.init_value);
        break;
      case InitKind::LinearDefault: {
        const double bound = 1.0 / std::sqrt(static_cast<double>(last));
        for (auto& x : dst) x = static_cast<T>(rng.uniform(-bound, bound));
        break;
      }
      case InitKind::ResidMix:
        PG_CHECK(s.shape.size() == 2 && s.shape[0] == 2, "init: resid_mix '{}' must be [2, d], is {}", s.name,
                 shape_str(s.shape));
        for (int64_t k = 0; k < last; ++k) {
          dst[k] = T(1);
          dst[last + k] = T(0);
        }
        break;
      case InitKind::Orthogonal: {
        // 2-D: one matrix; 3-D banks: one orthogonal matrix per slice, slices >= zero_slices_from zero.
        PG_CHECK(s.shape.size() == 2 || s.shape.size() == 3, "init: orthogonal '{}' must be 2-D or 3-D, is {}",
                 s.name, shape_str(s.shape));
        const int64_t slices = s.shape.size() == 3 ? s.shape[0] : 1;
        const int64_t rows = s.shape[s.shape.size() - 2], cols = last;
        std::vector<double> slice(static_cast<size_t>(rows * cols));
        for (int64_t b = 0; b < slices; ++b) {
          T* out = dst.data() + b * rows * cols;
          if (s.zero_slices_from >= 0 && b >= s.zero_slices_from) {
            std::fill(out, out + rows * cols, T(0));
            continue;
          }
          orthogonal_init(slice.data(), rows, cols, s.init_value, rng);
          for (int64_t k = 0; k < rows * cols; ++k) out[k] = static_cast<T>(slice[k]);
        }
        break;
      }
    }
  }
}

template void init_params<float>(ParamSet<float>&, uint64_t);
template void init_params<double>(ParamSet<double>&, uint64_t);

}  // namespace pgolf
