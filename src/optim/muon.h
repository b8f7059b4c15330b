// Muon (SPEC §4.2): momentum with Nesterov look-ahead, optional row normalisation (S1560's MuonEq-R),
// Newton–Schulz orthogonalisation, shape scale sqrt(max(1, rows/cols)), decoupled weight decay.
//
// A 2-D parameter is one matrix updated as the per-matrix Muon of the #414 family (BASE ... S691):
// fp32 momentum, the scale multiplies the (bf16) update. A 3-D parameter is a bank whose slices are
// matrices, updated as the banked Parallel Muon of #549 / S1560: bf16 gradient and momentum (in the
// bf16 numerics), the scale multiplies the learning rate.
//
// Parallel Muon over several ranks (SPEC §4.2): a bank's local gradients are zero-padded along the
// slice axis to a multiple of the world size and reduce-scattered (average; bf16 in the bf16
// numerics); rank r owns slices [r·P, (r+1)·P) (P = padded slices / world size), keeps their
// momentum current and orthogonalises them; the updates are all-gathered and every rank applies all
// of them. Every step of a slice is independent of the other slices, so the result is the
// one-rank result up to the order of the gradient reduction.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/params.h"
#include "optim/newton_schulz.h"
#include "optim/parallel_muon_plan.h"  // SliceShard

namespace pgolf {
class Communicator;
}

namespace pgolf::optim {

struct MuonOptions {
  double lr = 0.02;            // base learning rate (times the schedule's lr scale)
  double weight_decay = 0.0;   // decoupled: p ← p·(1 − lr·wd)
  int ns_steps = 5;
  bool row_normalize = false;  // u_row ← u_row / max(‖u_row‖₂, 1e-7) before Newton–Schulz
  MuonNumerics numerics = MuonNumerics::BF16;
};

class Muon {
 public:
  // `members`: indices (in `layout`) of the 2-D matrices and 3-D banks this optimizer updates.
  Muon(const ParamLayout& layout, std::vector<size_t> members, MuonOptions options);

  // One step on every member: lr = options.lr · lr_scale, momentum μ from the schedule. Without
  // `comm` (or with one rank) every gradient is already averaged. With `comm`, the 3-D banks run
  // Parallel Muon: their gradients are this rank's local ones (reduced here); 2-D members' gradients
  // must be averaged already. Every rank calls it (a collective).
  void step(ParamSet<float>& params, const ParamSet<float>& grads, double lr_scale, double momentum,
            Communicator* comm = nullptr);

  // Under Parallel Muon a rank keeps only its own slices of a bank's momentum current; this gathers
  // every rank's slices of member k into `full` (its whole momentum). A collective.
  void gather_bank_momentum(size_t k, Communicator& comm, std::span<float> full) const;
  bool is_bank(size_t k) const { return shapes_[k].bank; }

  const std::vector<size_t>& members() const { return members_; }
  const MuonOptions& options() const { return options_; }
  // Momentum buffer of member k (fp32 storage; bf16-representable values in the bf16 banked path).
  std::vector<float>& momentum_buffer(size_t k) { return momentum_[k]; }
  const std::vector<float>& momentum_buffer(size_t k) const { return momentum_[k]; }

 private:
  struct Member {
    size_t index;
    int64_t slices, rows, cols;  // [slices, rows, cols]; slices = 1 for a matrix
    bool bank;
  };
  // u ← the update of slices [first, first + count) of member k from their averaged gradient g
  // (both count·rows·cols): momentum, Nesterov, row normalisation, Newton–Schulz (and, for a 2-D
  // matrix, the shape scale).
  void orthogonalized_update(size_t k, int64_t first, int64_t count, std::span<const float> g, std::span<float> u,
                             float mu);
  // Decoupled weight decay and the step with the whole member's update u.
  void apply_update(size_t k, std::span<float> param, std::span<const float> u, double lr) const;
  void step_bank_sharded(size_t k, std::span<float> param, std::span<const float> grad, double lr, float mu,
                         Communicator& comm);

  std::vector<size_t> members_;
  std::vector<Member> shapes_;
  std::vector<std::vector<float>> momentum_;
  std::vector<float> update_;  // scratch for the largest member
  MuonOptions options_;
};

}  // namespace pgolf::optim
