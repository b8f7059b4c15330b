// Muon (SPEC §4.2): momentum with Nesterov look-ahead, optional row normalisation (S1560's MuonEq-R),
// Newton–Schulz orthogonalisation, shape scale sqrt(max(1, rows/cols)), decoupled weight decay.
//
// A 2-D parameter is one matrix updated as the per-matrix Muon of the #414 family (BASE ... S691):
// fp32 momentum, the scale multiplies the (bf16) update. A 3-D parameter is a bank whose slices are
// matrices, updated as the banked Parallel Muon of #549 / S1560: bf16 gradient and momentum (in the
// bf16 numerics), the scale multiplies the learning rate.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/params.h"
#include "optim/newton_schulz.h"

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

  // One step on every member: lr = options.lr · lr_scale, momentum μ from the schedule.
  void step(ParamSet<float>& params, const ParamSet<float>& grads, double lr_scale, double momentum);

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
  void step_member(size_t k, std::span<float> param, std::span<const float> grad, double lr, float mu);

  std::vector<size_t> members_;
  std::vector<Member> shapes_;
  std::vector<std::vector<float>> momentum_;
  std::vector<float> update_;  // scratch for the largest member
  MuonOptions options_;
};

}  // namespace pgolf::optim
