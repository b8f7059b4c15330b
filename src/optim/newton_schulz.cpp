#include "optim/newton_schulz.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/half.h"

namespace pgolf::optim {

namespace {

// Rounds a tensor op's output the way the emulated precision stores it.
struct StoreAs {
  bool bf16;
  float operator()(float x) const { return bf16 ? round_to_bf16(x) : x; }
};

// Elementwise loops are parallel only when the work pays for the threads.
constexpr int64_t kParallelElems = 1 << 15;

// C[n,n] = A[n,k] · A[n,k]ᵀ (symmetric: half the flops of a GEMM, then the upper triangle mirrored).
void gram(const float* a, float* c, int64_t n, int64_t k) {
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.0f, a,
              static_cast<int>(k), 0.0f, c, static_cast<int>(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) c[i * n + j] = c[j * n + i];
}

// C[m,n] = A[m,k] · B[k,n]
void gemm_ab(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a, static_cast<int>(k), b, static_cast<int>(n), 0.0f, c,
              static_cast<int>(n));
}

// out[i] = store(f(i)) for i in [0, n)
template <typename F>
void map_store(float* out, int64_t n, StoreAs store, F f) {
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
  for (int64_t i = 0; i < n; ++i) out[i] = store(f(i));
}

// Buffers of one wide matrix X [n, m] (n <= m), B·X [n, m], and the [n, n] temporaries
// A = X·Xᵀ, c·A, the c·A·A term and B = b·A + c·A·A.
struct Workspace {
  std::vector<float> x, bx, a, scaled, square, poly;
  Workspace(int64_t n, int64_t m) : x(n * m), bx(n * m), a(n * n), scaled(n * n), square(n * n), poly(n * n) {}
};

void orthogonalize_one(float* g, int64_t rows, int64_t cols, int steps, StoreAs store, NsForm form,
                       Workspace& ws) {
  const bool transposed = rows > cols;
  const int64_t n = transposed ? cols : rows, m = transposed ? rows : cols;
  const float a = static_cast<float>(kNsA), b = static_cast<float>(kNsB), c = static_cast<float>(kNsC);
  float* x = ws.x.data();

  // X = store(G) in the wide orientation.
  if (transposed) {
    map_store(x, n * m, store, [&](int64_t i) { return g[(i % m) * cols + i / m]; });
  } else {
    map_store(x, n * m, store, [&](int64_t i) { return g[i]; });
  }
  // X ← X / (‖X‖_F + eps): the norm is reduced in high precision and stored in X's precision.
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n * m; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float norm = store(static_cast<float>(std::sqrt(sum_sq)));
  const float denom = store(norm + static_cast<float>(kNsEps));
  map_store(x, n * m, store, [&](int64_t i) { return x[i] / denom; });

  for (int it = 0; it < steps; ++it) {
    gram(x, ws.a.data(), n, m);  // A = X·Xᵀ
    map_store(ws.a.data(), n * n, store, [&](int64_t i) { return ws.a[i]; });
    const float* A = ws.a.data();
    if (form == NsForm::ScaleThenSquare) {  // (c·A)·A
      map_store(ws.scaled.data(), n * n, store, [&](int64_t i) { return c * A[i]; });
      gemm_ab(ws.scaled.data(), A, ws.square.data(), n, n, n);
      map_store(ws.square.data(), n * n, store, [&](int64_t i) { return ws.square[i]; });
    } else {  // c·(A·A), A·A = A·Aᵀ as A is symmetric
      gram(A, ws.square.data(), n, n);
      map_store(ws.square.data(), n * n, store, [&](int64_t i) { return c * store(ws.square[i]); });
    }
    // B = b·A + (c·A·A)
    map_store(ws.poly.data(), n * n, store, [&](int64_t i) { return store(b * A[i]) + ws.square[i]; });
    gemm_ab(ws.poly.data(), x, ws.bx.data(), n, m, n);  // B·X
    // X ← a·X + B·X
    map_store(x, n * m, store, [&](int64_t i) { return store(a * x[i]) + store(ws.bx[i]); });
  }

  if (transposed) {
    map_store(g, n * m, StoreAs{false}, [&](int64_t i) { return x[(i % cols) * m + i / cols]; });
  } else {
    std::copy(x, x + n * m, g);
  }
}

}  // namespace

void newton_schulz_batched(std::span<float> x, int64_t count, int64_t rows, int64_t cols, int steps,
                           MuonNumerics numerics, NsForm form) {
  PG_CHECK(count >= 0 && rows > 0 && cols > 0 && static_cast<int64_t>(x.size()) == count * rows * cols,
           "newton_schulz_batched: {} values for {} matrices of [{}, {}]", x.size(), count, rows, cols);
  PG_CHECK(steps >= 0, "newton_schulz_batched: steps must be >= 0, got {}", steps);
  Workspace ws(std::min(rows, cols), std::max(rows, cols));
  const StoreAs store{numerics == MuonNumerics::BF16};
  for (int64_t s = 0; s < count; ++s) orthogonalize_one(x.data() + s * rows * cols, rows, cols, steps, store, form, ws);
}

}  // namespace pgolf::optim
