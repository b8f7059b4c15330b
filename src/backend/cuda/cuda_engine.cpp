// CudaEngine: construction, parameters and optimizer state, the training step, evaluation losses.
// TTT, LoRA and the GPTQ Hessians are in cuda_engine_ttt.cpp.
#include "backend/cuda/cuda_engine.h"

#include <algorithm>
#include <cmath>
#include <iterator>

#include "backend/cuda/cuda_engine_impl.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/residual.h"
#include "core/error.h"
#include "optim/parallel_muon_plan.h"

namespace pgolf::cuda {

namespace {

optim::OptimizerConfig optimizer_config(const Config& c) { return optim::OptimizerConfig::from_config(c); }

// The optimizer's own (global) clip norm: none when each rank clips its local gradients. The
// banked stack on several ranks (Parallel Muon) never holds averaged bank gradients, so it can clip
// only locally, as the references and the CPU engine do.
double global_clip_norm(const Config& c, const ParamLayout& layout, const Communicator& comm) {
  const optim::ParallelMuonPlan plan = optim::ParallelMuonPlan::of(layout, comm.rank(), comm.world_size());
  const bool local = c.get_bool("grad_clip_local");
  PG_CHECK(!plan.active() || c.get_double("grad_clip_norm") <= 0.0 || local,
           "the banked stack (Parallel Muon) on {} ranks clips each rank's local gradient: set grad_clip_local = true "
           "(as #549 / S1560) or grad_clip_norm = 0",
           comm.world_size());
  return local ? 0.0 : c.get_double("grad_clip_norm");
}

// attention_backward: "mma_sync", "wgmma" or "wgmma_ws".
AttentionBackwardKernel backward_kernel(const Config& c) {
  const std::string name = c.get_string("attention_backward");
  PG_CHECK(name == "mma_sync" || name == "wgmma" || name == "wgmma_ws",
           "attention_backward = '{}': expected mma_sync | wgmma | wgmma_ws", name);
  if (name == "wgmma") return AttentionBackwardKernel::wgmma;
  return name == "wgmma_ws" ? AttentionBackwardKernel::wgmma_ws : AttentionBackwardKernel::mma_sync;
}

GpuModelOptions model_options(const Config& c, const CudaEngineOptions& o) {
  PG_CHECK(o.max_tokens > 0, "CudaEngine: max_tokens must be positive, got {}", o.max_tokens);
  GpuModelOptions m;
  m.max_tokens = o.max_tokens;
  m.deterministic = o.deterministic;
  const std::string forward = c.get_string("attention_forward");
  PG_CHECK(forward == "mma_sync" || forward == "wgmma" || forward == "wgmma_ws",
           "attention_forward = '{}': expected mma_sync | wgmma | wgmma_ws", forward);
  if (forward == "mma_sync") {
    m.attention.forward_kernel = AttentionForwardKernel::mma_sync;
    m.attention.forward_warps = 4;  // the mma.sync forward's fastest shape
  } else if (forward == "wgmma") {
    m.attention.forward_kernel = AttentionForwardKernel::wgmma;
    m.attention.forward_warps = 8;  // the wgmma forward's fastest shape
    m.attention.forward_key_tile = 64;
  }
  m.attention.backward_kernel = backward_kernel(c);
  if (m.attention.backward_kernel == AttentionBackwardKernel::mma_sync)
    m.attention.backward_warps = 8;  // the mma.sync backward's fastest shape
  const std::string mlp = c.get_string("mlp_gemm");
  PG_CHECK(mlp == "fused" || mlp == "cublas", "mlp_gemm = '{}': expected fused | cublas", mlp);
  m.mlp_fused = mlp == "fused";
  const std::string qkv = c.get_string("qkv_gemm");
  PG_CHECK(qkv == "eval" || qkv == "fused" || qkv == "cublas", "qkv_gemm = '{}': expected eval | fused | cublas", qkv);
  m.qkv_product = qkv == "fused" ? QkvProduct::fused : qkv == "eval" ? QkvProduct::evaluation : QkvProduct::separate;
  m.fold_dq_finish = c.get_bool("attention_dq_fold");
  m.bf16_norm_grads = c.get_bool("cuda_bf16_norm_grads");
  m.lora_side_stream = c.get_bool("cuda_lora_side_stream");
  // Process-wide (launch.cuh), set here so that it holds before the model's first launch.
  set_programmatic_launch(c.get_bool("cuda_pdl"));
  set_row_staging(c.get_bool("cuda_row_staging"));
  set_gemm_autotune(c.get_bool("cuda_gemm_autotune"));
  return m;
}

// The call of a step shape that captures it into a graph (step_graphs.h); 0 never captures.
int graph_capture_at(const Config& c) {
  const int64_t at = c.get_int("cuda_graph_capture_at");
  PG_CHECK(at >= 0 && at <= 1000000, "cuda_graph_capture_at = {}: expected 0 (never capture) or a call number >= 1", at);
  return static_cast<int>(at);
}

}  // namespace

CudaEngine::Impl::Impl(const Config& config, Communicator& comm_, const CudaEngineOptions& options_)
    : options(options_),
      comm(comm_),
      model(ModelConfig::from_config(config), model_options(config, options_)),
      // With local clipping the optimizer sees gradients that were already clipped (coefficient 1).
      optimizer(model.layout(), optimizer_config(config), global_clip_norm(config, model.layout(), comm_), &comm_),
      local_clip(config.get_double("grad_clip_norm")),
      ema_decay(config.get_double("ema_decay")),
      grad_clip_norm(config.get_double("grad_clip_norm")),
      grad_clip_local(config.get_bool("grad_clip_local")),
      graphs(options_.graphs && comm_.graph_capturable(), graph_capture_at(config)),
      eval_overlap(config.get_bool("cuda_eval_overlap")),
      loss_sum(1, "step loss sum"),
      step_agree(2, "step agreement values") {
  // The host communicators reduce host memory; several ranks need one that reduces device buffers
  // (NCCL), which enqueues on the engine's stream, in order with (and captured into) its graphs.
  PG_CHECK(comm.world_size() == 1 || comm.device_buffers(),
           "CudaEngine: {} ranks need a communicator of device buffers (NCCL)", comm.world_size());
  comm.set_stream(stream());
  if (optimizer.parallel_muon()) {
    const optim::ParallelMuonPlan& plan = optimizer.parallel_muon_plan();
    replicated_to_buffer = SegmentCopy(plan.replicated, "replicated gradient packing");
    buffer_to_replicated = SegmentCopy(optim::reversed(plan.replicated), "replicated gradient unpacking");
    replicated_buffer = DeviceBuffer<float>(static_cast<size_t>(plan.replicated_values), "replicated gradients");
  }
  void* host = nullptr;
  PG_CUDA_CHECK(cudaMallocHost(&host, sizeof(StepReadBack) * Engine::kMaxTrainPending));
  readback = new (host) StepReadBack[Engine::kMaxTrainPending]{};
  for (TrainSlot& t : train_slots) PG_CUDA_CHECK(cudaEventCreateWithFlags(&t.copied, cudaEventDisableTiming));
}

CudaEngine::Impl::~Impl() {
  // A step still pending (a loop left by an exception) runs on: wait for it before its buffers go.
  if (train_pending > 0) cudaStreamSynchronize(stream());
  for (TrainSlot& t : train_slots)
    if (t.copied) cudaEventDestroy(t.copied);
  if (readback) cudaFreeHost(readback);
  for (ResultSlot& r : results) {
    if (r.host) cudaFreeHost(r.host);
    if (r.copied) cudaEventDestroy(r.copied);
  }
}

CudaEngine::Impl::ResultSlot& CudaEngine::Impl::open_result(size_t n) {
  PG_CHECK(results_pending < Engine::kMaxPending, "CudaEngine: {} calls already wait to be collected",
           results_pending);
  ResultSlot& r = results[(results_head + results_pending) % Engine::kMaxPending];
  if (!r.copied) PG_CUDA_CHECK(cudaEventCreateWithFlags(&r.copied, cudaEventDisableTiming));
  if (r.capacity < n) {  // not pending: its last copy was waited for when it was collected
    if (r.host) PG_CUDA_CHECK(cudaFreeHost(r.host));
    r.host = nullptr;
    r.capacity = 0;
    void* host = nullptr;
    PG_CUDA_CHECK(cudaMallocHost(&host, n * sizeof(float)));
    r.host = static_cast<float*>(host);
    r.capacity = n;
  }
  r.n = n;
  return r;
}

void CudaEngine::Impl::close_result() {
  ResultSlot& r = results[(results_head + results_pending) % Engine::kMaxPending];
  PG_CUDA_CHECK(cudaEventRecord(r.copied, stream()));
  if (!eval_overlap) PG_CUDA_CHECK(cudaEventSynchronize(r.copied));  // the host waits, as a synchronous call
  ++results_pending;
}

std::string CudaEngine::Impl::shape_key(const Batch& b) const {
  std::string key = "B" + std::to_string(b.rows) + "T" + std::to_string(b.seq_len) + "S" +
                    std::to_string(b.cu_seqlens.empty() ? b.rows : static_cast<int64_t>(b.cu_seqlens.size()) - 1) +
                    (b.targets.empty() ? "" : "t");
  // The reference attention (head dims other than 64) sizes its launch by the longest segment.
  if (model.config().head_dim != 64) {
    const std::vector<int32_t> cu = b.segments();
    int32_t longest = 0;
    for (size_t s = 0; s + 1 < cu.size(); ++s) longest = std::max(longest, cu[s + 1] - cu[s]);
    key += "M" + std::to_string(longest);
  }
  return key;
}

void CudaEngine::Impl::read_back(void* dst, const void* src, size_t n) {
  PG_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream()));
}

void CudaEngine::Impl::synchronize() { PG_CUDA_CHECK(cudaStreamSynchronize(stream())); }

void CudaEngine::Impl::for_each_row_chunk(const Batch& batch, const std::function<void(const Batch&)>& fn) const {
  if (batch.tokens() <= options.max_tokens) return fn(batch);
  const ModelConfig& cfg = model.config();
  for (const Batch& piece : split_batch(batch, options.max_tokens)) {
    // A row cut into shorter rows keeps its position differences, but an NTK RoPE base depends on T,
    // and the bigram/trigram hashes and SmearGate read the previous token, which a new row lacks.
    if (piece.seq_len != batch.seq_len) {
      const bool ntk = cfg.rope_base_at(static_cast<int>(piece.seq_len)) != cfg.rope_base_at(static_cast<int>(batch.seq_len));
      const bool previous_token = cfg.smear_gate || cfg.bigram_vocab_size > 0 || cfg.bigram_direct_size > 0;
      PG_CHECK(!ntk && !previous_token,
               "CudaEngine: a row of {} tokens (more than max_tokens = {}) cannot be cut into rows of {}: the model's {} "
               "depends on the row",
               batch.seq_len, options.max_tokens, piece.seq_len, ntk ? "NTK RoPE base" : "previous-token features");
    }
    fn(piece);
  }
}

CudaEngine::CudaEngine(const Config& config, Communicator& comm, const CudaEngineOptions& options)
    : impl_(std::make_unique<Impl>(config, comm, options)) {}
CudaEngine::~CudaEngine() = default;

const ModelConfig& CudaEngine::model_config() const { return impl_->model.config(); }
const ParamLayout& CudaEngine::layout() const { return impl_->model.layout(); }
GpuModel& CudaEngine::model() { return impl_->model; }
const CudaEngineOptions& CudaEngine::options() const { return impl_->options; }
size_t CudaEngine::graphs_captured() const { return impl_->graphs.captured(); }

CudaEngine::HostCounters CudaEngine::host_counters() const {
  HostCounters c;
  c.graphs = impl_->graphs.stats();
  c.gemm_plans = impl_->model.gemm_plans();
  c.gemm_plan_seconds = impl_->model.gemm_plan_seconds();
  return c;
}

// ---- parameters and state --------------------------------------------------------------------------

void CudaEngine::load_params(const ParamSet<float>& params) {
  impl_->require_no_pending_steps("load_params");
  PG_CHECK(params.layout().total() == layout().total() && params.layout().size() == layout().size(),
           "load_params: {} parameters in {} tensors, the model has {} in {}", params.layout().count(),
           params.layout().size(), layout().count(), layout().size());
  impl_->model.load_params(params);
}

void CudaEngine::store_params(ParamSet<float>& params) const {
  impl_->require_no_pending_steps("store_params");
  if (params.layout().total() != layout().total()) params = ParamSet<float>(layout());
  impl_->model.store_params(params);
}

TensorMap CudaEngine::optimizer_state() const {
  impl_->require_no_pending_steps("optimizer_state");
  TensorMap t = impl_->optimizer.state_tensors(impl_->stream());  // a collective under Parallel Muon
  if (impl_->ema) {
    TensorMap e = impl_->ema->state_tensors();
    for (auto& name : e.names()) t.set(name, std::move(e.get(name)));
  }
  return t;
}

void CudaEngine::load_optimizer_state(const TensorMap& state, const std::string& what) {
  Impl& m = *impl_;
  m.optimizer.load_state_tensors(state, what);
  bool has_ema = false;
  for (auto& n : state.names()) has_ema |= n.rfind("ema/", 0) == 0;
  if (has_ema) {
    if (!m.ema) init_ema();
    m.ema->load_state_tensors(state, what);
  } else if (m.ema) {
    m.ema.reset();
    m.graphs.clear();  // graphs that update the EMA read its buffer
  }
}

void CudaEngine::init_ema() {
  Impl& m = *impl_;
  m.synchronize();
  m.ema.reset();
  m.graphs.clear();  // the new EMA buffer is somewhere else
  m.ema.emplace(layout(), m.model.params(), m.ema_decay);
}

void CudaEngine::store_ema(ParamSet<float>& out) const {
  impl_->require_no_pending_steps("store_ema");
  PG_CHECK(impl_->ema.has_value(), "store_ema: the EMA was never initialised (init_ema)");
  if (out.layout().total() != layout().total()) out = ParamSet<float>(layout());
  PG_CUDA_CHECK(cudaDeviceSynchronize());
  PG_CUDA_CHECK(cudaMemcpy(out.all().data(), impl_->ema->average(), out.all().size() * sizeof(float),
                           cudaMemcpyDeviceToHost));
}

void CudaEngine::set_looping(bool on) { impl_->model.set_looping(on); }
void CudaEngine::set_qat(bool on) {
  impl_->qat = on;
  impl_->model.set_qat(on);
}

// ---- training ----------------------------------------------------------------------------------------

void CudaEngine::Impl::enqueue_micro(bool first) {
  if (first) model.zero_grad();
  model.forward_for_backward(false);
  accumulate_loss(model.device_loss(), loss_sum.data(), first, stream());
  model.backward();
}

// Scale (accumulation), clip locally or reduce then clip globally, step, average, refresh bf16 copies:
// the CPU engine's reduce_and_clip and step. Under Parallel Muon only the replicated gradients are
// averaged here (packed, one all-reduce); the optimizer reduce-scatters the banks' local gradients.
void CudaEngine::Impl::enqueue_update(int micro_batches, bool update_ema) {
  const int64_t total = model.layout().total();
  float* g = model.grads();
  // Each micro-step's loss is scaled by 1/n in the references; scaling the sum once is the same up to
  // rounding (exact when n is a power of two), as the CPU engine does.
  if (micro_batches > 1) scale_f32(g, total, 1.0f / static_cast<float>(micro_batches), stream());
  if (clips_locally()) {
    local_clip.enqueue(g, total, stream());
    if (grad_clip_norm > 0) apply_clip(g, total, local_clip.state(), stream());
  }
  if (optimizer.parallel_muon()) {
    replicated_to_buffer.enqueue(g, replicated_buffer.data(), stream());
    comm.all_reduce(replicated_buffer.data(), replicated_buffer.size(), DType::F32, ReduceOp::Avg);
    buffer_to_replicated.enqueue(replicated_buffer.data(), g, stream());
  } else {
    comm.all_reduce(g, static_cast<size_t>(total), DType::F32, ReduceOp::Avg);
  }
  optimizer.enqueue_step(model.params(), g, stream());
  if (update_ema) ema->update(model.params(), stream());
  model.params_changed();
  model.refresh_weights();
}

// The graph key's mode part: the last refresh bakes the late-QAT mode in; the EMA update is there or not.
std::string CudaEngine::Impl::update_mode(bool update_ema) const {
  return std::string(update_ema ? " ema" : "") + (qat ? " qat" : "");
}

void CudaEngine::Impl::begin_update(const StepControl& control) {
  PG_CHECK(!control.update_ema || ema.has_value(), "train_step: update_ema without init_ema");
  model.prepare_weights();  // the graphs start from fresh bf16 copies of the training mode
  optimizer.begin_step(control.step, control.lr_scale, control.muon_momentum, stream());
}

void CudaEngine::Impl::submit_readback(const StepControl& control, int micro_batches) {
  PG_CHECK(train_pending < Engine::kMaxTrainPending, "CudaEngine: {} training steps already wait to be collected",
           train_pending);
  const int index = (train_head + train_pending) % Engine::kMaxTrainPending;
  const GradClip& clip = clips_locally() ? local_clip : optimizer.clip();
  StepReadBack& back = readback[index];
  std::copy(control.agree_max.begin(), control.agree_max.end(), back.agree);
  if (comm.world_size() > 1) {
    // The ranks' loss average and agreement, reduced behind the step on its stream: collecting the
    // step then needs no collective, which would wait behind a step submitted after this one. The
    // slot's pinned values are the copy's source until the step is collected.
    PG_CUDA_CHECK(cudaMemcpyAsync(step_agree.data(), back.agree, sizeof(back.agree), cudaMemcpyHostToDevice, stream()));
    comm.all_reduce(step_agree.data(), 2, DType::F64, ReduceOp::Max);
    comm.all_reduce(loss_sum.data(), 1, DType::F64, ReduceOp::Avg);
    read_back(back.agree, step_agree.data(), sizeof(back.agree));
  }
  // Stream-ordered before the next step's graph overwrites the loss sum and the clip state.
  read_back(&back.loss_sum, loss_sum.data(), sizeof(double));
  read_back(&back.clip, clip.state(), sizeof(GradClipState));
  TrainSlot& t = train_slots[index];
  PG_CUDA_CHECK(cudaEventRecord(t.copied, stream()));
  t.step = control.step;
  t.micro_batches = micro_batches;
  ++train_pending;
}

StepResult CudaEngine::Impl::collect_step() {
  PG_CHECK(train_pending > 0, "CudaEngine::collect_train_step: no training step is pending");
  const TrainSlot& t = train_slots[train_head];
  const StepReadBack& back = readback[train_head];
  train_head = (train_head + 1) % Engine::kMaxTrainPending;
  --train_pending;
  PG_CUDA_CHECK(cudaEventSynchronize(t.copied));
  StepResult r;
  r.grad_norm = back.clip.norm;
  PG_CHECK(std::isfinite(r.grad_norm), "step {}: gradient norm is {} (NaN or infinite loss?)", t.step, r.grad_norm);
  r.loss = back.loss_sum / static_cast<double>(t.micro_batches);
  std::copy(std::begin(back.agree), std::end(back.agree), r.agreed.begin());
  PG_CHECK(std::isfinite(r.loss), "step {}: training loss is {}", t.step, r.loss);
  return r;
}

StepResult CudaEngine::train_step(std::span<const Batch> micro_batches, const StepControl& control) {
  PG_CHECK(impl_->train_pending == 0, "train_step: {} submitted steps are not collected yet", impl_->train_pending);
  submit_train_step(micro_batches, control);
  return collect_train_step();
}

StepResult CudaEngine::collect_train_step() { return impl_->collect_step(); }
int CudaEngine::train_steps_pending() const { return impl_->train_pending; }

void CudaEngine::submit_train_step(std::span<const Batch> micro_batches, const StepControl& control) {
  Impl& m = *impl_;
  PG_CHECK(!micro_batches.empty(), "train_step needs at least one micro-batch");
  PG_CHECK(m.results_pending == 0, "train_step: {} submitted evaluation calls are not collected yet",
           m.results_pending);
  GpuModel& model = m.model;
  const int n = static_cast<int>(micro_batches.size());
  model.set_train(true);
  model.set_frozen_base(false);
  model.set_lora(nullptr);
  for (int k = 0; k < n; ++k) {
    const Batch& b = micro_batches[static_cast<size_t>(k)];
    PG_CHECK(!b.targets.empty(), "train_step: a micro-batch has no targets");
    model.set_batch(b);
    const std::string key = m.shape_key(b) + "v" + std::to_string(model.num_virtual_layers());
    if (n == 1) {
      m.begin_update(control);
      m.graphs.run("train " + key + m.update_mode(control.update_ema), m.stream(), [&] {
        m.enqueue_micro(true);
        m.enqueue_update(1, control.update_ema);
      });
    } else {
      model.prepare_weights();
      m.graphs.run((k == 0 ? "micro0 " : "micro ") + key, m.stream(), [&] { m.enqueue_micro(k == 0); });
    }
  }
  if (n > 1) {
    m.begin_update(control);
    m.graphs.run("update n" + std::to_string(n) + m.update_mode(control.update_ema), m.stream(),
                 [&] { m.enqueue_update(n, control.update_ema); });
  }
  m.submit_readback(control, n);
}

StepResult CudaEngine::optimizer_step(const StepControl& control) {
  impl_->require_no_pending_steps("optimizer_step");
  Impl& m = *impl_;
  m.model.set_train(true);
  m.begin_update(control);
  m.graphs.run("update n1" + m.update_mode(control.update_ema), m.stream(),
               [&] { m.enqueue_update(1, control.update_ema); });
  m.submit_readback(control, 1);
  return m.collect_step();
}

// ---- evaluation ------------------------------------------------------------------------------------

void CudaEngine::token_losses(const Batch& batch, std::vector<float>& nll) {
  PG_CHECK(pending() == 0, "token_losses: {} submitted calls are not collected yet", pending());
  submit_token_losses(batch);
  collect(nll);
}

void CudaEngine::submit_token_losses(const Batch& batch) {
  impl_->require_no_pending_steps("submit_token_losses");
  Impl& m = *impl_;
  PG_CHECK(!batch.targets.empty(), "token_losses: the batch has no targets");
  GpuModel& model = m.model;
  model.set_train(false);
  model.set_lora(nullptr);
  Impl::ResultSlot& slot = m.open_result(static_cast<size_t>(batch.tokens()));
  size_t at = 0;
  m.for_each_row_chunk(batch, [&](const Batch& chunk) {
    model.set_batch(chunk);
    model.prepare_weights();
    // The selected rows (Batch::losses_from) set the shapes of the last layer's query side and the head.
    m.graphs.run("eval " + m.shape_key(chunk) + "v" + std::to_string(model.num_virtual_layers()) + "m" +
                     std::to_string(model.selected_rows()),
                 m.stream(), [&] { model.forward(); });
    // Stream-ordered before the next call's forward overwrites the losses.
    m.read_back(slot.host + at, model.device_token_losses(), static_cast<size_t>(chunk.tokens()) * sizeof(float));
    at += static_cast<size_t>(chunk.tokens());
  });
  m.close_result();
}

void CudaEngine::collect(std::vector<float>& nll) {
  Impl& m = *impl_;
  PG_CHECK(m.results_pending > 0, "CudaEngine::collect: no call is pending");
  Impl::ResultSlot& r = m.results[m.results_head];
  PG_CUDA_CHECK(cudaEventSynchronize(r.copied));
  nll.assign(r.host, r.host + r.n);
  m.results_head = (m.results_head + 1) % Engine::kMaxPending;
  --m.results_pending;
}

int CudaEngine::pending() const { return impl_->results_pending; }

}  // namespace pgolf::cuda
