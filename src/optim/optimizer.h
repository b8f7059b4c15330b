// The optimizer of a training run: the parameter groups of SPEC §4.1 (from ParamSpec::group) with
// their hyperparameters, one AdamW per Adam group and one Muon, stepped in the references' order,
// and the whole state as checkpoint tensors.
//
// Gradient clipping (optim/clip.h) is the caller's, before step(): which gradients it sees
// (rank-averaged or local) depends on the distributed setup.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "model/params.h"
#include "optim/adam.h"
#include "optim/muon.h"

namespace pgolf::optim {

// Per-group hyperparameters resolved from a preset.
struct OptimizerConfig {
  AdamOptions embed;   // token embeddings (+ bigram / value embeddings): tied_embed_lr, embed_wd (−1 = adam_wd)
  AdamOptions scalar;  // 1-D and control tensors: scalar_lr, adam_wd
  MuonOptions matrix;  // block matrices and banks: matrix_lr, muon_wd, muon_backend_steps, row normalisation, numerics

  static OptimizerConfig from_config(const Config& c);
};

class Optimizer {
 public:
  Optimizer(const ParamLayout& layout, const OptimizerConfig& config);

  // One step with the gradients as given (already clipped). `step_index` is the number of steps
  // taken before this one (0 for the first); it must agree with the optimizer's own count, so a
  // resume from mismatched state fails here instead of silently using wrong bias corrections.
  // lr_scale multiplies every group's base lr; momentum is Muon's μ for this step. With `comm` the
  // banks run Parallel Muon (their gradients are this rank's local ones, see optim/muon.h) and every
  // other gradient must already be averaged across ranks.
  void step(ParamSet<float>& params, const ParamSet<float>& grads, int64_t step_index, double lr_scale,
            double momentum, Communicator* comm = nullptr);

  int64_t steps_taken() const { return steps_taken_; }
  const std::vector<size_t>& members(ParamGroup g) const;
  const Adam& embed() const { return embed_; }
  const Adam& scalar() const { return scalar_; }
  const Muon& muon() const { return muon_; }

  // "optim/<param>/exp_avg", "optim/<param>/exp_avg_sq" (Adam groups), "optim/<param>/momentum_buffer"
  // (Muon), all F32 in the parameter's shape, and "optim/step" (I64). Loading requires exactly
  // these "optim/" tensors; other tensors of the map (parameters, EMA, ...) are ignored.
  // With `comm` (Parallel Muon on several ranks) the bank momenta are gathered from their owners
  // first: a collective, and the result is the same on every rank.
  TensorMap state_tensors(Communicator* comm = nullptr) const;
  void load_state_tensors(const TensorMap& t, const std::string& what);

 private:
  inline static const std::string kStatePrefix = "optim/";

  // Calls f(name, shape, values) for every state array; Self is Optimizer or const Optimizer.
  template <typename Self, typename F>
  static void visit_state(Self& self, F&& f) {
    for (auto* adam : {&self.embed_, &self.scalar_}) {
      for (size_t k = 0; k < adam->members().size(); ++k) {
        const ParamSpec& s = self.layout_.spec(adam->members()[k]);
        f(kStatePrefix + s.name + "/exp_avg", s.shape, adam->exp_avg(k));
        f(kStatePrefix + s.name + "/exp_avg_sq", s.shape, adam->exp_avg_sq(k));
      }
    }
    for (size_t k = 0; k < self.muon_.members().size(); ++k) {
      const ParamSpec& s = self.layout_.spec(self.muon_.members()[k]);
      f(kStatePrefix + s.name + "/momentum_buffer", s.shape, self.muon_.momentum_buffer(k));
    }
  }

  ParamLayout layout_;
  std::vector<size_t> embed_members_, scalar_members_, matrix_members_;
  Adam embed_;
  Adam scalar_;
  Muon muon_;
  bool banked_ = false;  // the Muon group holds 3-D banks (#549 / S1560 stepping order)
  int64_t steps_taken_ = 0;
};

}  // namespace pgolf::optim
