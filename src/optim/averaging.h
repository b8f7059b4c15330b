// Weight averaging (SPEC §4.6): an EMA of the parameters (#414, S691, S1560) and uniform SWA
// (I6, I5, S562). Both keep fp32 state in the ParamSet layout and save it into checkpoints.
#pragma once

#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "model/params.h"

namespace pgolf::optim {

// ema ← d·ema + (1 − d)·θ after every optimizer step, starting from the initial weights; at the end
// the model takes the EMA weights.
class Ema {
 public:
  Ema(const ParamSet<float>& initial, double decay);

  void update(const ParamSet<float>& params);
  const ParamSet<float>& average() const { return average_; }
  void copy_to(ParamSet<float>& params) const;
  double decay() const { return decay_; }

  // Tensors "ema/<param>" (F32), restored bit-exactly by load_state_tensors.
  TensorMap state_tensors() const;
  void load_state_tensors(const TensorMap& t, const std::string& what);

 private:
  ParamSet<float> average_;
  double decay_;
};

// Running sum of snapshots taken when the schedule says so (Schedule::swa_snapshot_due); at the end
// the model takes sum / count if at least two snapshots were taken.
class Swa {
 public:
  explicit Swa(const ParamLayout& layout);

  void add(const ParamSet<float>& params);
  int64_t count() const { return count_; }
  bool ready() const { return count_ >= 2; }
  void average_into(ParamSet<float>& params) const;  // requires ready()

  // Tensors "swa/<param>" (F32) and "swa/count" (I64).
  TensorMap state_tensors() const;
  void load_state_tensors(const TensorMap& t, const std::string& what);

 private:
  ParamSet<float> sum_;
  int64_t count_ = 0;
};

}  // namespace pgolf::optim
