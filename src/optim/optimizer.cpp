#include "optim/optimizer.h"

#include <set>

#include "core/error.h"
#include "dist/communicator.h"
#include "optim/state_io.h"

namespace pgolf::optim {

namespace {

std::vector<size_t> members_of(const ParamLayout& layout, ParamGroup g) {
  std::vector<size_t> out;
  for (size_t i = 0; i < layout.size(); ++i)
    if (layout.spec(i).group == g) out.push_back(i);
  return out;
}

MuonNumerics numerics_from_name(const std::string& name) {
  if (name == "bf16") return MuonNumerics::BF16;
  if (name == "fp32") return MuonNumerics::F32;
  fail("muon_ns_dtype '{}' is not one of bf16, fp32", name);
}

}  // namespace

OptimizerConfig OptimizerConfig::from_config(const Config& c) {
  OptimizerConfig o;
  const double beta1 = c.get_double("beta1"), beta2 = c.get_double("beta2"), eps = c.get_double("adam_eps");
  PG_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, "beta1 {} and beta2 {} must be in [0, 1)",
           beta1, beta2);
  const double adam_wd = c.get_double("adam_wd");
  const double embed_wd = c.get_double("embed_wd");
  o.embed = {c.get_double("tied_embed_lr"), beta1, beta2, eps, embed_wd < 0.0 ? adam_wd : embed_wd};
  o.scalar = {c.get_double("scalar_lr"), beta1, beta2, eps, adam_wd};
  o.matrix.lr = c.get_double("matrix_lr");
  o.matrix.weight_decay = c.get_double("muon_wd");
  o.matrix.ns_steps = static_cast<int>(c.get_int("muon_backend_steps"));
  o.matrix.row_normalize = c.get_bool("muon_row_normalize");
  o.matrix.numerics = numerics_from_name(c.get_string("muon_ns_dtype"));
  return o;
}

Optimizer::Optimizer(const ParamLayout& layout, const OptimizerConfig& config)
    : layout_(layout),
      embed_members_(members_of(layout, ParamGroup::Embed)),
      scalar_members_(members_of(layout, ParamGroup::Scalar)),
      matrix_members_(members_of(layout, ParamGroup::Matrix)),
      embed_(layout, embed_members_, config.embed),
      scalar_(layout, scalar_members_, config.scalar),
      muon_(layout, matrix_members_, config.matrix) {
  for (size_t i : matrix_members_) banked_ = banked_ || layout.spec(i).shape.size() == 3;
}

const std::vector<size_t>& Optimizer::members(ParamGroup g) const {
  switch (g) {
    case ParamGroup::Embed: return embed_members_;
    case ParamGroup::Scalar: return scalar_members_;
    case ParamGroup::Matrix: return matrix_members_;
  }
  fail("unknown parameter group {}", static_cast<int>(g));
}

void Optimizer::step(ParamSet<float>& params, const ParamSet<float>& grads, int64_t step_index, double lr_scale,
                     double momentum, Communicator* comm) {
  PG_CHECK(params.layout().total() == layout_.total() && grads.layout().total() == layout_.total(),
           "optimizer step: {} parameters and {} gradients for a model of {}", params.layout().total(),
           grads.layout().total(), layout_.total());
  PG_CHECK(step_index == steps_taken_,
           "optimizer step {} requested but the optimizer state has taken {} steps (resumed from other state?)",
           step_index, steps_taken_);
  const int64_t t = steps_taken_ + 1;
  // The groups read only their own gradients, so the order does not change the numbers; it is the
  // references' (per-matrix Muon: token AdamW, Muon, scalar AdamW; banked: token, scalar, Muon).
  embed_.step(params, grads, lr_scale, t);
  if (banked_) {
    scalar_.step(params, grads, lr_scale, t);
    muon_.step(params, grads, lr_scale, momentum, comm);
  } else {
    muon_.step(params, grads, lr_scale, momentum, comm);
    scalar_.step(params, grads, lr_scale, t);
  }
  steps_taken_ = t;
}

TensorMap Optimizer::state_tensors(Communicator* comm) const {
  TensorMap out;
  visit_state(*this, [&](const std::string& name, const Shape& shape, const std::vector<float>& values) {
    put_f32(out, name, shape, values);
  });
  if (comm != nullptr && comm->world_size() > 1) {
    for (size_t k = 0; k < muon_.members().size(); ++k) {
      if (!muon_.is_bank(k)) continue;
      const ParamSpec& s = layout_.spec(muon_.members()[k]);
      muon_.gather_bank_momentum(k, *comm, out.get(kStatePrefix + s.name + "/momentum_buffer").as<float>());
    }
  }
  put_i64(out, kStatePrefix + "step", steps_taken_);
  return out;
}

void Optimizer::load_state_tensors(const TensorMap& t, const std::string& what) {
  // Check everything before changing anything, so a failed load leaves the optimizer as it was.
  std::set<std::string> expected{kStatePrefix + "step"};
  visit_state(*this, [&](const std::string& name, const Shape&, const std::vector<float>&) { expected.insert(name); });
  for (const std::string& name : t.names())
    PG_CHECK(name.rfind(kStatePrefix, 0) != 0 || expected.count(name),
             "{}: '{}' is not optimizer state of this model (another preset or model size?)", what, name);
  std::vector<float> scratch;
  visit_state(*this, [&](const std::string& name, const Shape& shape, const std::vector<float>& values) {
    scratch.resize(values.size());
    get_f32(t, name, shape, scratch, what);
  });
  const int64_t steps = get_i64(t, kStatePrefix + "step", what);
  PG_CHECK(steps >= 0, "{}: optim/step is {}", what, steps);
  visit_state(*this, [&](const std::string& name, const Shape& shape, std::vector<float>& values) {
    get_f32(t, name, shape, values, what);
  });
  steps_taken_ = steps;
}

}  // namespace pgolf::optim
