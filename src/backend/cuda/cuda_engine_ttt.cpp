// CudaEngine: score-first TTT over the base weights, per-document LoRA adapters, GPTQ Hessians —
// the CPU engine's rules (train/cpu_engine.cpp) on the device.
#include <algorithm>

#include "backend/cuda/cuda_engine_impl.h"
#include "backend/cuda/lora.h"
#include "core/error.h"

namespace pgolf::cuda {

// ---- score-first TTT over the base weights --------------------------------------------------------

void CudaEngine::ttt_begin(const TttOptimizerConfig& config) {
  impl_->require_no_pending_steps("ttt_begin");
  Impl& m = *impl_;
  PG_CHECK(config.freeze_blocks == 0 || !model_config().param_banks,
           "ttt_freeze_blocks needs per-layer weights; the banked stack stores blocks in shared banks");
  Impl::Ttt s;
  s.config = config;
  const bool adamw = config.kind == TttOptimizerConfig::Kind::AdamW;
  if (adamw) {
    s.multiplier[2] = static_cast<float>(config.proj_lr_mult);
    s.multiplier[3] = static_cast<float>(config.fc_lr_mult);
  }
  // Per value: 0 frozen (also the layout's padding), 1 base LR, 2 ".proj." and 3 ".fc." (AdamW only).
  const ParamLayout& lay = layout();
  std::vector<uint8_t> classes(static_cast<size_t>(lay.total()), 0);
  for (size_t i = 0; i < lay.size(); ++i) {
    const std::string& name = lay.spec(i).name;
    uint8_t k = 1;
    if (adamw && name.find(".proj.") != std::string::npos) k = 2;
    else if (adamw && name.find(".fc.") != std::string::npos) k = 3;
    for (int b = 0; b < config.freeze_blocks; ++b)
      if (name.rfind("blocks." + std::to_string(b) + ".", 0) == 0) k = 0;
    if (s.multiplier[k] == 0.f) k = 0;  // a zero multiplier freezes as the CPU engine's lr_mult 0 does
    std::fill(classes.begin() + lay.offset(i), classes.begin() + lay.offset(i) + lay.numel(i), k);
  }
  s.classes = DeviceBuffer<uint8_t>(classes, "TTT learning-rate classes");
  s.buf1 = DeviceBuffer<float>(static_cast<size_t>(lay.total()), "TTT optimizer state");
  s.buf1.fill_bytes(0);
  if (adamw) {
    s.buf2 = DeviceBuffer<float>(static_cast<size_t>(lay.total()), "TTT optimizer state");
    s.buf2.fill_bytes(0);
  }
  s.scalars = DeviceBuffer<TttStepScalars>(1, "TTT step scalars");
  s.clip = std::make_unique<GradClip>(config.grad_clip);
  m.ttt = std::move(s);
  m.graphs.clear();  // earlier TTT graphs read the previous state buffers
}

double CudaEngine::ttt_step(const Batch& batch, double lr_scale) {
  Impl& m = *impl_;
  PG_CHECK(m.ttt.has_value(), "ttt_step without ttt_begin");
  PG_CHECK(!batch.targets.empty(), "ttt_step: the batch has no targets");
  Impl::Ttt& s = *m.ttt;
  GpuModel& model = m.model;
  const cudaStream_t stream = m.stream();
  model.set_train(true);
  model.set_frozen_base(false);
  model.set_lora(nullptr);
  model.set_batch(batch);
  model.prepare_weights();

  ++s.steps;
  const double lr = s.config.lr * lr_scale;
  TttStepScalars scalars;
  for (int k = 0; k < kTttClasses; ++k) {
    scalars.sgd_lr[k] = static_cast<float>(lr) * s.multiplier[k];
    scalars.adam[k] = optim::adam_coeffs(lr * s.multiplier[k], s.config.beta1, s.config.beta2,
                                         s.config.weight_decay, s.config.eps, s.steps);
  }
  scalars.momentum = static_cast<float>(s.config.momentum);
  scalars.first_step = s.steps == 1 ? 1 : 0;
  write_ttt_scalars(s.scalars.data(), scalars, stream);

  const int64_t total = layout().total();
  const bool adamw = s.config.kind == TttOptimizerConfig::Kind::AdamW;
  const std::string key = std::string(adamw ? "ttt-adamw " : "ttt-sgd ") + m.shape_key(batch) + "v" +
                          std::to_string(model.num_virtual_layers()) + (m.qat ? " qat" : "");
  m.graphs.run(key, stream, [&] {
    model.zero_grad();
    model.forward_for_backward(false);
    accumulate_loss(model.device_loss(), m.loss_sum.data(), true, stream);
    model.backward();
    float* g = model.grads();
    m.comm.all_reduce(g, static_cast<size_t>(total), DType::F32, ReduceOp::Avg);
    s.clip->enqueue(g, total, stream);
    if (adamw)
      ttt_adamw_step(model.params(), g, s.buf1.data(), s.buf2.data(), s.classes.data(), total, s.scalars.data(),
                     s.clip->state(), stream);
    else
      ttt_sgd_step(model.params(), g, s.buf1.data(), s.classes.data(), total, s.scalars.data(), s.clip->state(),
                   stream);
    model.params_changed();
    model.refresh_weights();
  });
  m.read_back(&m.readback->loss_sum, m.loss_sum.data(), sizeof(double));
  m.read_back(&m.readback->clip, s.clip->state(), sizeof(GradClipState));
  m.synchronize();
  GradClip::checked_norm(m.readback->clip);
  return m.readback->loss_sum;
}

void CudaEngine::ttt_end() {
  impl_->synchronize();
  impl_->ttt.reset();
  impl_->graphs.clear();
}

// ---- per-document LoRA TTT ------------------------------------------------------------------------

void CudaEngine::lora_begin(const LoraConfig& lora, int64_t rows, const LoraOptimizerConfig& opt) {
  impl_->require_no_pending_steps("lora_begin");
  Impl& m = *impl_;
  Impl::Lora s;
  s.config = lora;
  s.opt = opt;
  s.rows = rows;
  s.slots = m.model.num_virtual_layers();
  std::vector<LoraAdapterLayout> layout;  // GpuLora keeps its own copy
  s.total = lora_layout(model_config(), lora, rows, s.slots, layout);
  // With beta1 = 0 (s1560) the first moment is the gradient itself: no buffer, no pass over it.
  if (opt.beta1 != 0.0) {
    s.exp_avg = DeviceBuffer<float>(static_cast<size_t>(s.total), "LoRA Adam state");
    s.exp_avg.fill_bytes(0);
  }
  s.exp_avg_sq = DeviceBuffer<float>(static_cast<size_t>(s.total), "LoRA Adam state");
  s.exp_avg_sq.fill_bytes(0);
  s.coeffs = DeviceBuffer<optim::AdamCoeffs>(1, "LoRA AdamW coefficients");
  m.lora = std::move(s);
  m.graphs.clear();  // earlier LoRA graphs read the previous adapters and state
}

void CudaEngine::lora_reset(uint64_t seed) {
  Impl& m = *impl_;
  PG_CHECK(m.lora.has_value(), "lora_reset without lora_begin");
  Impl::Lora& s = *m.lora;
  // The CPU adapters' draw (LoraAdapters::reset), made on the device with the same bits (GpuLora::draw).
  s.seed = seed;
  s.pending = !s.adapters;
  if (s.adapters) s.adapters->draw(seed, m.stream());
  if (s.opt.beta1 != 0.0) s.exp_avg.fill_bytes(0);
  s.exp_avg_sq.fill_bytes(0);
  s.steps = 0;
}

// Adapters for batches of up to `seq_len` tokens per row. A longer row moves the parameters to new
// adapters whose hidden states hold rows of the next multiple of 512 tokens: a few moves per run
// (the windows grow chunk by chunk up to the context), not one per chunk.
void CudaEngine::Impl::ensure_lora_adapters(int64_t seq_len) {
  Lora& s = *lora;
  if (s.adapters && seq_len <= s.adapters->seq_len()) return;
  PG_CHECK(s.adapters || s.pending, "LoRA adapters were never initialised (lora_reset)");
  const int64_t capacity = (seq_len + 511) / 512 * 512;
  auto grown = std::make_unique<GpuLora>(model.config(), s.config, s.rows, s.slots, capacity);
  if (s.adapters)
    grown->copy_params_from(*s.adapters, stream());  // then freed (cudaFree waits for the copy)
  else
    grown->draw(s.seed, stream());
  s.adapters = std::move(grown);
  s.adapters->set_overwrite_grads(true);  // each step's backward writes them: no zeroing pass
  s.pending = false;
  graphs.clear();  // graphs of the smaller adapters read freed buffers
}

void CudaEngine::Impl::lora_step(const Batch& batch, std::span<const float> token_weights, float* nll) {
  Lora& s = *lora;
  PG_CHECK(batch.rows <= s.rows, "LoRA batch has {} rows, the adapters {}", batch.rows, s.rows);
  PG_CHECK(!batch.targets.empty(), "LoRA TTT: the batch has no targets");
  ensure_lora_adapters(batch.seq_len);
  GpuLora& adapters = *s.adapters;
  model.set_train(false);
  model.set_frozen_base(true);
  model.set_lora(&adapters);
  model.set_batch(batch);
  // Outside the graph: the bf16 copies of the rows this batch reads (after a step or a draw), the
  // token weights and the step's AdamW coefficients; the graph reads them from device memory.
  model.prepare_weights();
  const bool train = !token_weights.empty();
  if (train) {
    model.set_token_weights(token_weights);
    ++s.steps;
    write_adam_coeffs(s.coeffs.data(),
                      optim::adam_coeffs(s.opt.lr, s.opt.beta1, s.opt.beta2, s.opt.weight_decay, s.opt.eps, s.steps),
                      stream());
  }
  const int64_t rows = batch.rows;
  // The selected rows (Batch::losses_from: each row's chunk) set the shapes of the head.
  const std::string key = "lora " + shape_key(batch) + "v" + std::to_string(model.num_virtual_layers()) + "m" +
                          std::to_string(model.selected_rows()) + " cap" + std::to_string(adapters.seq_len()) +
                          (train ? " train" : "");
  graphs.run(key, stream(), [&] {
    if (!train) return model.forward();
    model.forward_for_backward(true);
    model.backward_weighted();
    adapters.adamw_rows(rows, s.opt.beta1 != 0.0 ? s.exp_avg.data() : nullptr, s.exp_avg_sq.data(), s.coeffs.data(),
                        stream());
  });
  if (nll) read_back(nll, model.device_token_losses(), static_cast<size_t>(batch.tokens()) * sizeof(float));
  model.set_lora(nullptr);
  model.set_frozen_base(false);
}

void CudaEngine::lora_score_and_train(const Batch& batch, std::span<const float> token_weights,
                                      std::vector<float>& nll) {
  PG_CHECK(pending() == 0, "lora_score_and_train: {} submitted calls are not collected yet", pending());
  submit_lora(batch, token_weights);
  collect(nll);
}

void CudaEngine::submit_lora(const Batch& batch, std::span<const float> token_weights) {
  Impl& m = *impl_;
  PG_CHECK(m.lora.has_value(), "lora_score_and_train without lora_begin");
  Impl::ResultSlot& slot = m.open_result(static_cast<size_t>(batch.tokens()));
  m.lora_step(batch, token_weights, slot.host);
  m.close_result();
}

void CudaEngine::lora_train_step(const Batch& batch, std::span<const float> token_weights) {
  PG_CHECK(impl_->lora.has_value(), "lora_train_step without lora_begin");
  PG_CHECK(!token_weights.empty(), "lora_train_step: no token weights");
  impl_->lora_step(batch, token_weights, nullptr);
}

void CudaEngine::lora_end() {
  impl_->model.set_lora(nullptr);
  impl_->synchronize();
  impl_->lora.reset();
  impl_->graphs.clear();
}

// ---- GPTQ calibration -----------------------------------------------------------------------------

// xᵀx for x [rows, cols] (bf16 activations, fp32 products and sums), on the host.
std::vector<float> CudaEngine::Impl::gram_of(const __nv_bfloat16* x, int64_t rows, int cols) {
  if (!gram_gemm) gram_gemm = std::make_unique<GemmRunner>();
  const size_t need = static_cast<size_t>(cols) * cols;
  if (gram.size() < need) gram = DeviceBuffer<float>(need, "Hessian scratch");
  GemmShape s;
  s.m = cols, s.n = cols, s.k = static_cast<int>(rows), s.trans_a = true, s.output = GemmOutput::kF32;
  gram_gemm->run(s, x, x, gram.data(), 1.f, 0.f, stream());
  std::vector<float> product(need);
  read_back(product.data(), gram.data(), need * sizeof(float));
  synchronize();
  return product;
}

namespace {

// hessians[name] += product ([cols, cols], created zero on first use).
void add_to(TensorMap& hessians, const std::string& name, int cols, const std::vector<float>& product) {
  if (!hessians.has(name)) {
    HostTensor h(DType::F32, {cols, cols});
    std::fill(h.bytes.begin(), h.bytes.end(), uint8_t{0});
    hessians.set(name, std::move(h));
  }
  HostTensor& h = hessians.get(name);
  PG_CHECK(h.shape == (Shape{cols, cols}), "accumulate_hessians: {} has shape {}, expected [{},{}]", name,
           shape_str(h.shape), cols, cols);
  auto acc = h.as<float>();
  for (size_t i = 0; i < product.size(); ++i) acc[i] += product[i];
}

}  // namespace

void CudaEngine::accumulate_hessians(const Batch& batch, TensorMap& hessians) {
  impl_->require_no_pending_steps("accumulate_hessians");
  Impl& m = *impl_;
  GpuModel& model = m.model;
  model.set_train(false);
  model.set_lora(nullptr);
  m.for_each_row_chunk(batch, [&](const Batch& chunk) {
    model.set_batch(chunk);
    model.forward();
    const int64_t N = chunk.tokens();
    for (int v = 0; v < model.num_virtual_layers(); ++v) {
      const std::string b = "blocks." + std::to_string(model.physical_layer(v)) + ".";
      const GpuModel::DeviceLinearInputs in = model.linear_inputs(v);
      // q, k and v read the same input: the same bits under the three names.
      const std::vector<float> attn = m.gram_of(in.attn_in, N, in.attn_cols);
      for (const char* w : {"attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight"})
        add_to(hessians, b + w, in.attn_cols, attn);
      add_to(hessians, b + "attn.proj.weight", in.proj_cols, m.gram_of(in.proj_in, N, in.proj_cols));
      add_to(hessians, b + "mlp.fc.weight", in.attn_cols, m.gram_of(in.fc_in, N, in.attn_cols));
      add_to(hessians, b + "mlp.proj.weight", in.mlp_cols, m.gram_of(in.mlp_hidden, N, in.mlp_cols));
    }
    const int d = model.config().model_dim;
    add_to(hessians, "tok_emb.weight", d, m.gram_of(model.final_norm_device(), N, d));
  });
}

}  // namespace pgolf::cuda
