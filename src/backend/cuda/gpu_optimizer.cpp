#include "backend/cuda/gpu_optimizer.h"

#include <algorithm>

#include "core/error.h"
#include "dist/communicator.h"
#include "optim/state_io.h"

namespace pgolf::cuda {
namespace {

std::vector<size_t> members_where(const ParamLayout& layout, bool matrix_group) {
  std::vector<size_t> out;
  for (size_t i = 0; i < layout.size(); ++i)
    if ((layout.spec(i).group == ParamGroup::Matrix) == matrix_group) out.push_back(i);
  return out;
}

std::vector<AdamTensor> adam_tensors(const ParamLayout& layout, const std::vector<size_t>& members) {
  std::vector<AdamTensor> out;
  for (size_t i : members)
    out.push_back(AdamTensor{layout.offset(i), layout.numel(i),
                             layout.spec(i).group == ParamGroup::Embed ? AdamGroup::kEmbed : AdamGroup::kScalar});
  return out;
}

std::vector<MuonTensor> muon_tensors(const ParamLayout& layout, const std::vector<size_t>& members,
                                     const optim::OptimizerConfig& config) {
  PG_CHECK(config.matrix.numerics == optim::MuonNumerics::BF16,
           "the CUDA optimizer runs Newton-Schulz in bf16 (muon_ns_dtype = \"bf16\"); fp32 Muon is CPU-only");
  std::vector<MuonTensor> out;
  for (size_t i : members) {
    const ParamSpec& s = layout.spec(i);
    PG_CHECK(s.shape.size() == 2 || s.shape.size() == 3, "Muon updates matrices and 3-D banks; '{}' has shape {}",
             s.name, shape_str(s.shape));
    const bool bank = s.shape.size() == 3;
    out.push_back(
        MuonTensor{layout.offset(i), bank ? s.shape[0] : 1, s.shape[bank ? 1 : 0], s.shape[bank ? 2 : 1], bank});
  }
  return out;
}

const std::string kStatePrefix = "optim/";

}  // namespace

GpuOptimizer::GpuOptimizer(const ParamLayout& layout, const optim::OptimizerConfig& config, double grad_clip_norm,
                           Communicator* comm)
    : layout_(layout),
      config_(config),
      comm_(comm),
      plan_(optim::ParallelMuonPlan::of(layout, comm ? comm->rank() : 0, comm ? comm->world_size() : 1)),
      adam_members_(members_where(layout, false)),
      muon_members_(members_where(layout, true)),
      clip_(grad_clip_norm),
      adamw_(adam_tensors(layout, adam_members_)),
      muon_(muon_tensors(layout, muon_members_, config), config.matrix.ns_steps, config.matrix.row_normalize, &plan_),
      scalars_(1, "optimizer step scalars") {
  PG_CHECK(!plan_.active() || comm_->device_buffers(),
           "GpuOptimizer: Parallel Muon over {} ranks needs a communicator of device buffers", plan_.world_size);
  // The bank gradients are reduced before any clip coefficient could reach them (the references clip
  // each rank's local gradients before the reduce-scatter).
  PG_CHECK(!plan_.active() || grad_clip_norm <= 0.0,
           "GpuOptimizer: under Parallel Muon ({} ranks) the optimizer cannot clip; clip the local gradients first",
           plan_.world_size);
}

void GpuOptimizer::begin_step(int64_t step_index, double lr_scale, double momentum, cudaStream_t stream) {
  PG_CHECK(step_index == steps_taken_,
           "optimizer step {} requested but the optimizer state has taken {} steps (resumed from other state?)",
           step_index, steps_taken_);
  const int64_t t = steps_taken_ + 1;
  // The coefficients exactly as the CPU optimizers form them (optim/adam.cpp, optim/muon.cpp).
  auto adam = [&](const optim::AdamOptions& o) {
    return optim::adam_coeffs(o.lr * lr_scale, o.beta1, o.beta2, o.weight_decay, o.eps, t);
  };
  OptimizerStepScalars s;
  s.embed = adam(config_.embed);
  s.scalar = adam(config_.scalar);
  s.muon_lr = config_.matrix.lr * lr_scale;
  s.muon_decay = static_cast<float>(1.0 - s.muon_lr * config_.matrix.weight_decay);
  s.muon_momentum = static_cast<float>(momentum);
  write_step_scalars(scalars_.data(), s, stream);
  steps_taken_ = t;
}

void GpuOptimizer::enqueue_step(float* params, const float* grads, cudaStream_t stream) {
  clip_.enqueue(grads, layout_.total(), stream);
  if (!muon_.sharded()) {
    adamw_.enqueue(params, grads, scalars_.data(), clip_.state(), stream);
    muon_.enqueue(params, grads, scalars_.data(), clip_.state(), stream);
    return;
  }
  // Parallel Muon (the clip coefficient is 1: nothing is clipped here).
  const size_t block = static_cast<size_t>(muon_.block_values());
  muon_.enqueue_pack_bank_grads(grads, stream);
  comm_->reduce_scatter(muon_.bank_grad_blocks(), muon_.bank_grad_shard(), block, DType::BF16, ReduceOp::Avg);
  adamw_.enqueue(params, grads, scalars_.data(), clip_.state(), stream);
  muon_.enqueue_prepare(grads, scalars_.data(), clip_.state(), stream);
  muon_.enqueue_newton_schulz(stream);
  muon_.enqueue_export_updates(stream);
  comm_->all_gather(muon_.update_block(), muon_.update_gather(), block, DType::BF16);
  muon_.enqueue_apply(params, scalars_.data(), stream);
}

void GpuOptimizer::step(float* params, const float* grads, int64_t step_index, double lr_scale, double momentum,
                        cudaStream_t stream) {
  begin_step(step_index, lr_scale, momentum, stream);
  enqueue_step(params, grads, stream);
}

TensorMap GpuOptimizer::state_tensors(cudaStream_t stream) {
  if (muon_.sharded()) {
    muon_.enqueue_pack_owned_momenta(stream);
    comm_->all_gather(muon_.update_block(), muon_.update_gather(), static_cast<size_t>(muon_.block_values()),
                      DType::BF16);
    muon_.enqueue_unpack_gathered_momenta(stream);
  }
  PG_CUDA_CHECK(cudaDeviceSynchronize());
  TensorMap out;
  std::vector<float> values;
  auto download = [&](const float* device, size_t count) {
    values.resize(count);
    PG_CUDA_CHECK(cudaMemcpy(values.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost));
    return std::span<const float>(values);
  };
  // The CPU optimizer's order: the token-embedding group, the scalar group, Muon, the step count.
  for (ParamGroup group : {ParamGroup::Embed, ParamGroup::Scalar}) {
    for (size_t k = 0; k < adam_members_.size(); ++k) {
      const ParamSpec& s = layout_.spec(adam_members_[k]);
      if (s.group != group) continue;
      const size_t n = static_cast<size_t>(s.numel());
      optim::put_f32(out, kStatePrefix + s.name + "/exp_avg", s.shape,
                     download(adamw_.exp_avg() + adamw_.state_offset(k), n));
      optim::put_f32(out, kStatePrefix + s.name + "/exp_avg_sq", s.shape,
                     download(adamw_.exp_avg_sq() + adamw_.state_offset(k), n));
    }
  }
  for (size_t k = 0; k < muon_members_.size(); ++k) {
    const ParamSpec& s = layout_.spec(muon_members_[k]);
    optim::put_f32(out, kStatePrefix + s.name + "/momentum_buffer", s.shape, muon_.momentum(k));
  }
  optim::put_i64(out, kStatePrefix + "step", steps_taken_);
  return out;
}

void GpuOptimizer::load_state_tensors(const TensorMap& t, const std::string& what) {
  // The CPU optimizer checks names, dtypes, shapes and the step count (and rejects state of another
  // model) before anything here changes; its arrays are then copied to the device.
  optim::Optimizer host(layout_, config_);
  host.load_state_tensors(t, what);
  PG_CUDA_CHECK(cudaDeviceSynchronize());
  auto upload = [](float* device, const std::vector<float>& v) {
    PG_CUDA_CHECK(cudaMemcpy(device, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  };
  for (size_t k = 0; k < adam_members_.size(); ++k) {
    const size_t index = adam_members_[k];
    const optim::Adam& group = layout_.spec(index).group == ParamGroup::Embed ? host.embed() : host.scalar();
    const auto& members = group.members();
    const size_t j = static_cast<size_t>(std::find(members.begin(), members.end(), index) - members.begin());
    upload(adamw_.exp_avg() + adamw_.state_offset(k), group.exp_avg(j));
    upload(adamw_.exp_avg_sq() + adamw_.state_offset(k), group.exp_avg_sq(j));
  }
  for (size_t k = 0; k < muon_members_.size(); ++k) muon_.set_momentum(k, host.muon().momentum_buffer(k));
  steps_taken_ = host.steps_taken();
}

}  // namespace pgolf::cuda
