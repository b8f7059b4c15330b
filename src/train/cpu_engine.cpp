#include "train/cpu_engine.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/gemm.h"
#include "core/rng.h"
#include "optim/clip.h"
#include "optim/parallel_muon_plan.h"
#include "optim/update_math.h"

namespace pgolf {

CpuEngine::CpuEngine(const Config& config, Communicator& comm)
    : model_(ModelConfig::from_config(config)),
      comm_(comm),
      optimizer_(model_.params().layout(), optim::OptimizerConfig::from_config(config)),
      ema_decay_(config.get_double("ema_decay")),
      grad_clip_norm_(config.get_double("grad_clip_norm")),
      grad_clip_local_(config.get_bool("grad_clip_local")) {
  const optim::ParallelMuonPlan plan = optim::ParallelMuonPlan::of(layout(), comm_.rank(), comm_.world_size());
  parallel_muon_ = !plan.banks.empty();
  replicated_runs_ = plan.replicated;
  replicated_buffer_.resize(static_cast<size_t>(plan.replicated_values));
  PG_CHECK(!parallel_muon_ || comm_.world_size() == 1 || grad_clip_norm_ <= 0.0 || grad_clip_local_,
           "the banked stack (Parallel Muon) on {} ranks clips each rank's local gradient: set grad_clip_local = true "
           "(as #549 / S1560) or grad_clip_norm = 0",
           comm_.world_size());
}

void CpuEngine::load_params(const ParamSet<float>& params) {
  PG_CHECK(params.layout().total() == layout().total() && params.layout().size() == layout().size(),
           "load_params: {} parameters in {} tensors, the model has {} in {}", params.layout().total(),
           params.layout().size(), layout().total(), layout().size());
  std::copy(params.all().begin(), params.all().end(), model_.params().all().begin());
}

void CpuEngine::store_params(ParamSet<float>& params) const {
  if (params.layout().total() != layout().total()) params = ParamSet<float>(layout());
  std::copy(model_.params().all().begin(), model_.params().all().end(), params.all().begin());
}

TensorMap CpuEngine::optimizer_state() const {
  TensorMap t = optimizer_.state_tensors(parallel_muon_ ? &comm_ : nullptr);
  if (ema_) {
    TensorMap e = ema_->state_tensors();
    for (auto& name : e.names()) t.set(name, std::move(e.get(name)));
  }
  return t;
}

void CpuEngine::load_optimizer_state(const TensorMap& state, const std::string& what) {
  optimizer_.load_state_tensors(state, what);
  bool has_ema = false;
  for (auto& n : state.names()) has_ema |= n.rfind("ema/", 0) == 0;
  if (has_ema) {
    if (!ema_) ema_.emplace(model_.params(), ema_decay_);
    ema_->load_state_tensors(state, what);
  } else {
    ema_.reset();
  }
}

void CpuEngine::init_ema() { ema_.emplace(model_.params(), ema_decay_); }

void CpuEngine::store_ema(ParamSet<float>& out) const {
  PG_CHECK(ema_.has_value(), "store_ema: the EMA was never initialised (init_ema)");
  out = ema_->average();
}

double CpuEngine::reduce_and_clip(bool clip_local, double max_norm, bool banks_local) {
  std::span<float> g = model_.grads().all();
  // Without ranks to average over, local and averaged gradients are the same; under Parallel Muon no
  // rank ever holds the averaged bank gradients, so the norm is the local one.
  clip_local = clip_local || comm_.world_size() == 1 || banks_local;
  double norm = 0.0;
  if (clip_local) norm = max_norm > 0 ? optim::clip_grad_norm(g, max_norm) : optim::global_l2_norm(g);
  if (comm_.world_size() == 1) return norm;
  if (banks_local) {
    std::vector<float>& buf = replicated_buffer_;
    for (const optim::CopyRun& r : replicated_runs_) std::copy_n(g.begin() + r.from, r.count, buf.begin() + r.to);
    comm_.all_reduce(buf.data(), buf.size(), ReduceOp::Avg);
    for (const optim::CopyRun& r : replicated_runs_) std::copy_n(buf.begin() + r.to, r.count, g.begin() + r.from);
  } else {
    comm_.all_reduce(g.data(), g.size(), ReduceOp::Avg);
  }
  if (!clip_local) norm = max_norm > 0 ? optim::clip_grad_norm(g, max_norm) : optim::global_l2_norm(g);
  return norm;
}

StepResult CpuEngine::train_step(std::span<const Batch> micro_batches, const StepControl& control) {
  PG_CHECK(!micro_batches.empty(), "train_step needs at least one micro-batch");
  model_.set_train(true);
  model_.set_frozen_base(false);
  model_.set_lora(nullptr);
  model_.zero_grad();
  double loss_sum = 0.0;
  for (const Batch& b : micro_batches) {
    PG_CHECK(!b.targets.empty(), "train_step: a micro-batch has no targets");
    loss_sum += static_cast<double>(model_.forward(b));
    model_.backward();
  }
  // Each micro-step's loss is scaled by 1/n before its backward in the references; scaling the sum
  // once is the same up to rounding (exact when n is a power of two, as 8 / world_size is).
  if (micro_batches.size() > 1) {
    const float inv = 1.0f / static_cast<float>(micro_batches.size());
    for (float& x : model_.grads().all()) x *= inv;
  }
  // Steps are numbered from 1 in messages, as in the training log.
  StepResult r;
  r.loss = loss_sum / static_cast<double>(micro_batches.size());
  comm_.all_reduce_host(&r.loss, 1, ReduceOp::Avg);
  PG_CHECK(std::isfinite(r.loss), "step {}: training loss is {}: the run diverged", control.step + 1, r.loss);
  r.agreed = control.agree_max;
  comm_.all_reduce_host(r.agreed.data(), r.agreed.size(), ReduceOp::Max);
  r.grad_norm = reduce_and_clip(grad_clip_local_, grad_clip_norm_, parallel_muon_);
  PG_CHECK(std::isfinite(r.grad_norm), "step {}: gradient norm is {} with a finite loss {}", control.step + 1,
           r.grad_norm, r.loss);
  optimizer_.step(model_.params(), model_.grads(), control.step, control.lr_scale, control.muon_momentum,
                  parallel_muon_ ? &comm_ : nullptr);
  if (control.update_ema) {
    PG_CHECK(ema_.has_value(), "train_step: update_ema without init_ema");
    ema_->update(model_.params());
  }
  return r;
}

void CpuEngine::token_losses(const Batch& batch, std::vector<float>& nll) {
  PG_CHECK(!batch.targets.empty(), "token_losses: the batch has no targets");
  model_.set_train(false);
  model_.set_lora(nullptr);
  model_.forward(batch);
  auto l = model_.token_losses();
  nll.assign(l.begin(), l.end());
}

// ---- score-first TTT over the base weights --------------------------------------------------------

void CpuEngine::ttt_begin(const TttOptimizerConfig& config) {
  TttState s;
  s.config = config;
  const ParamLayout& lay = layout();
  s.lr_mult.assign(static_cast<size_t>(lay.total()), 1.0f);
  PG_CHECK(config.freeze_blocks == 0 || !model_config().param_banks,
           "ttt_freeze_blocks needs per-layer weights; the banked stack stores blocks in shared banks");
  for (size_t i = 0; i < lay.size(); ++i) {
    const std::string& name = lay.spec(i).name;
    float mult = 1.0f;
    if (config.kind == TttOptimizerConfig::Kind::AdamW) {
      if (name.find(".proj.") != std::string::npos) mult = static_cast<float>(config.proj_lr_mult);
      else if (name.find(".fc.") != std::string::npos) mult = static_cast<float>(config.fc_lr_mult);
    }
    for (int b = 0; b < config.freeze_blocks; ++b)
      if (name.rfind("blocks." + std::to_string(b) + ".", 0) == 0) mult = 0.0f;
    std::fill(s.lr_mult.begin() + lay.offset(i), s.lr_mult.begin() + lay.offset(i) + lay.numel(i), mult);
  }
  s.buf1.assign(static_cast<size_t>(lay.total()), 0.0f);
  if (config.kind == TttOptimizerConfig::Kind::AdamW) s.buf2.assign(static_cast<size_t>(lay.total()), 0.0f);
  ttt_ = std::move(s);
}

double CpuEngine::ttt_step(const Batch& batch, double lr_scale) {
  PG_CHECK(ttt_.has_value(), "ttt_step without ttt_begin");
  TttState& s = *ttt_;
  model_.set_train(true);
  model_.set_frozen_base(false);
  model_.set_lora(nullptr);
  model_.zero_grad();
  const double loss = static_cast<double>(model_.forward(batch));
  model_.backward();
  reduce_and_clip(false, s.config.grad_clip, false);
  ++s.steps;
  std::span<float> p = model_.params().all();
  std::span<const float> g = model_.grads().all();
  const double lr = s.config.lr * lr_scale;
  if (s.config.kind == TttOptimizerConfig::Kind::Sgd) {
    // torch.optim.SGD(momentum=m): buf = m·buf + g (buf = g at the first step), p -= lr·buf.
    const float m = static_cast<float>(s.config.momentum);
    for (size_t i = 0; i < p.size(); ++i) {
      if (s.lr_mult[i] == 0.0f) continue;
      s.buf1[i] = s.steps == 1 ? g[i] : m * s.buf1[i] + g[i];
      p[i] -= static_cast<float>(lr) * s.lr_mult[i] * s.buf1[i];
    }
  } else {
    const ParamLayout& lay = layout();
    for (size_t t = 0; t < lay.size(); ++t) {
      const float mult = s.lr_mult[static_cast<size_t>(lay.offset(t))];
      if (mult == 0.0f) continue;
      const optim::AdamCoeffs c = optim::adam_coeffs(lr * mult, s.config.beta1, s.config.beta2,
                                                     s.config.weight_decay, s.config.eps, s.steps);
      for (int64_t k = lay.offset(t); k < lay.offset(t) + lay.numel(t); ++k) {
        const size_t i = static_cast<size_t>(k);
        optim::adamw_update(p[i], g[i], s.buf1[i], s.buf2[i], c);
      }
    }
  }
  return loss;
}

void CpuEngine::ttt_end() { ttt_.reset(); }

// ---- per-document LoRA TTT ------------------------------------------------------------------------

void CpuEngine::lora_begin(const LoraConfig& lora, int64_t rows, const LoraOptimizerConfig& opt) {
  LoraState s;
  s.opt = opt;
  s.adapters = std::make_unique<LoraAdapters<float>>(model_config(), lora, rows, model_.num_virtual_layers());
  s.exp_avg.assign(s.adapters->params().size(), 0.0f);
  s.exp_avg_sq.assign(s.adapters->params().size(), 0.0f);
  lora_ = std::move(s);
}

void CpuEngine::lora_reset(uint64_t seed) {
  PG_CHECK(lora_.has_value(), "lora_reset without lora_begin");
  Rng rng(seed);
  lora_->adapters->reset(rng);
  std::fill(lora_->exp_avg.begin(), lora_->exp_avg.end(), 0.0f);
  std::fill(lora_->exp_avg_sq.begin(), lora_->exp_avg_sq.end(), 0.0f);
  lora_->steps = 0;
}

// One AdamW step of the adapters of the batch's first `rows` rows (the others' documents are done:
// they keep their values and moments, as on the CUDA engine).
void CpuEngine::lora_optimizer_step(int64_t rows) {
  LoraState& s = *lora_;
  ++s.steps;
  const optim::AdamCoeffs c =
      optim::adam_coeffs(s.opt.lr, s.opt.beta1, s.opt.beta2, s.opt.weight_decay, s.opt.eps, s.steps);
  std::span<float> p = s.adapters->params();
  std::span<const float> g = s.adapters->grads();
  for (const LoraRowSegment& seg : lora_row_segments(s.adapters->layout(), static_cast<int>(s.adapters->rank())))
    for (int64_t i = seg.offset; i < seg.offset + rows * seg.per_row; ++i) {
      const auto k = static_cast<size_t>(i);
      optim::adamw_update(p[k], g[k], s.exp_avg[k], s.exp_avg_sq[k], c);
    }
}

void CpuEngine::lora_score_and_train(const Batch& batch, std::span<const float> token_weights,
                                     std::vector<float>& nll) {
  PG_CHECK(lora_.has_value(), "lora_score_and_train without lora_begin");
  PG_CHECK(batch.rows <= lora_->adapters->rows(), "LoRA batch has {} rows, the adapters {}", batch.rows,
           lora_->adapters->rows());
  model_.set_train(false);
  model_.set_frozen_base(true);
  model_.set_lora(lora_->adapters.get());
  model_.forward(batch);
  auto l = model_.token_losses();
  nll.assign(l.begin(), l.end());
  if (!token_weights.empty()) {
    lora_->adapters->zero_grad();
    model_.backward(token_weights);
    lora_optimizer_step(batch.rows);
  }
  model_.set_lora(nullptr);
  model_.set_frozen_base(false);
}

void CpuEngine::lora_train_step(const Batch& batch, std::span<const float> token_weights) {
  PG_CHECK(lora_.has_value(), "lora_train_step without lora_begin");
  model_.set_train(false);
  model_.set_frozen_base(true);
  model_.set_lora(lora_->adapters.get());
  model_.forward(batch);
  lora_->adapters->zero_grad();
  model_.backward(token_weights);
  lora_optimizer_step(batch.rows);
  model_.set_lora(nullptr);
  model_.set_frozen_base(false);
}

void CpuEngine::lora_end() {
  model_.set_lora(nullptr);
  lora_.reset();
}

// ---- GPTQ calibration -----------------------------------------------------------------------------

void CpuEngine::accumulate_hessians(const Batch& batch, TensorMap& hessians) {
  model_.set_train(false);
  model_.set_lora(nullptr);
  model_.forward(batch);
  const int64_t N = batch.tokens();
  // H[name] += Xᵀ X for X [N, cols] (fp32, as the references accumulate on the GPU).
  auto add = [&](const std::string& name, std::span<const float> x) {
    PG_CHECK(N > 0 && x.size() % static_cast<size_t>(N) == 0, "accumulate_hessians: {} has {} values for {} rows",
             name, x.size(), N);
    const int64_t cols = static_cast<int64_t>(x.size()) / N;
    if (!hessians.has(name)) {
      HostTensor h(DType::F32, {cols, cols});
      std::fill(h.bytes.begin(), h.bytes.end(), uint8_t{0});
      hessians.set(name, std::move(h));
    }
    HostTensor& h = hessians.get(name);
    PG_CHECK(h.shape == (Shape{cols, cols}), "accumulate_hessians: {} has shape {}, expected [{},{}]", name,
             shape_str(h.shape), cols, cols);
    cpu::gemm<float>(true, false, cols, cols, N, 1.0f, x.data(), cols, x.data(), cols, 1.0f, h.as<float>().data(),
                     cols);
  };
  for (int v = 0; v < model_.num_virtual_layers(); ++v) {
    const std::string b = "blocks." + std::to_string(model_.physical_layer(v)) + ".";
    auto in = model_.linear_inputs(v);
    add(b + "attn.c_q.weight", in.attn_in);
    add(b + "attn.c_k.weight", in.attn_in);
    add(b + "attn.c_v.weight", in.attn_in);
    add(b + "attn.proj.weight", in.proj_in);
    add(b + "mlp.fc.weight", in.fc_in);
    add(b + "mlp.proj.weight", in.mlp_hidden);
  }
  add("tok_emb.weight", model_.final_norm_output());
}

}  // namespace pgolf
