// Newton–Schulz orthogonalization of Muon updates (SPEC §4.2), on a batch of equally shaped matrices
// (one Muon matrix, or the slices of a 3-D parameter bank), with OpenBLAS GEMMs.
#pragma once

#include <cstdint>
#include <span>

namespace pgolf::optim {

// fp32: every op in fp32 (the golden "Muon-fp32" variant).
// bf16: the references' eager bf16 arithmetic emulated on the CPU — every tensor op's output is
// rounded to bf16 where PyTorch's bf16 op would round it; GEMMs take bf16 operands and accumulate
// in fp32, as cuBLAS's bf16 GEMMs do.
enum class MuonNumerics { F32, BF16 };

// The two written forms of the iteration's middle term, which round differently in bf16:
// per-matrix Muon (#414 family, BASE...S691) writes `B = b*A + c*A @ A`, i.e. (c·A)·A;
// banked Parallel Muon (#549, S1560) writes `B = b*A + c*(A @ A)`.
enum class NsForm { ScaleThenSquare, SquareThenScale };

// The quintic iteration's coefficients (a, b, c).
inline constexpr double kNsA = 3.4445, kNsB = -4.7750, kNsC = 2.0315;
inline constexpr double kNsEps = 1e-7;  // Frobenius normalisation: X / (‖X‖_F + eps)

// In place on `x` = `count` row-major matrices [rows, cols]: each one is normalised by its Frobenius
// norm, transposed to the wide orientation when rows > cols, iterated `steps` times
// (A = X·Xᵀ; B = b·A + c·A·A; X ← a·X + B·X) and transposed back.
void newton_schulz_batched(std::span<float> x, int64_t count, int64_t rows, int64_t cols, int steps,
                           MuonNumerics numerics, NsForm form);

}  // namespace pgolf::optim
