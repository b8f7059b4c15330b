#include "train/trainer.h"

#include <fmt/core.h>

#include <array>
#include <chrono>
#include <cmath>
#include <optional>

#include "core/error.h"
#include "core/safetensors.h"
#include "data/loaders.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "dist/communicator.h"
#include "model/engine.h"
#include "model/init.h"
#include "optim/averaging.h"
#include "optim/schedule.h"
#include "train/run_log.h"

namespace pgolf {

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// The training batches of one rank: the preset's loader (stream or docpack), grad_accum micro-batches
// per optimizer step, and the loader's resumable state.
class TrainBatches {
 public:
  TrainBatches(const Config& c, int rank, int world_size, int grad_accum, int bos_id)
      : batch_tokens_(c.get_int("train_batch_tokens")), seq_len_(c.get_int("train_seq_len")), grad_accum_(grad_accum),
        kind_(c.get_string("train_loader")) {
    const std::vector<fs::path> files = find_shards(c.get_string("train_files"));
    const int64_t vocab = c.get_int("vocab_size");
    if (kind_ == "stream") stream_.emplace(files, rank, world_size, vocab);
    else if (kind_ == "docpack") docpack_.emplace(files, bos_id, rank, world_size, vocab);
    else fail("train_loader '{}' is not one of stream, docpack", kind_);
  }

  std::vector<Batch> next_step() {
    std::vector<Batch> micro;
    for (int m = 0; m < grad_accum_; ++m)
      micro.push_back(stream_ ? stream_->next(batch_tokens_, grad_accum_, seq_len_)
                              : docpack_->next(batch_tokens_, grad_accum_, seq_len_));
    return micro;
  }

  nlohmann::json state() const {
    return {{"kind", kind_}, {"state", stream_ ? nlohmann::json(stream_->state()) : nlohmann::json(docpack_->state())}};
  }

  void restore(const nlohmann::json& j, const std::string& what) {
    PG_CHECK(j.value("kind", std::string()) == kind_, "{}: the checkpoint's loader is '{}', this run's '{}'", what,
             j.value("kind", std::string()), kind_);
    if (stream_) stream_->restore(j.at("state").get<StreamState>());
    else docpack_->restore(j.at("state").get<DocPackState>());
  }

 private:
  int64_t batch_tokens_, seq_len_;
  int grad_accum_;
  std::string kind_;
  std::optional<SequentialLoader> stream_;
  std::optional<DocPackingLoader> docpack_;
};

// Training time: runs between pause() and resume(), starting from a saved total.
class TrainTimer {
 public:
  explicit TrainTimer(double base_ms) : base_ms_(base_ms), t0_(Clock::now()) {}
  double elapsed_ms() const { return base_ms_ + (running_ ? ms_since(t0_) : 0.0); }
  void pause() {
    base_ms_ = elapsed_ms();
    running_ = false;
  }
  void resume() {
    t0_ = Clock::now();
    running_ = true;
  }

 private:
  double base_ms_;
  Clock::time_point t0_;
  bool running_ = true;
};

nlohmann::json eval_json(const FlatEvalResult& r, const std::string& prefix) {
  return {{prefix + "_loss", r.val_loss},   {prefix + "_bpb", r.val_bpb},           {prefix + "_tokens", r.tokens},
          {prefix + "_bytes", r.bytes},     {prefix + "_eval_seconds", r.seconds}};
}

}  // namespace

fs::path resolve_run_dir(const Config& config) {
  std::string dir = config.get_string("run_dir");
  const std::string key = "{preset}";
  for (size_t p = dir.find(key); p != std::string::npos; p = dir.find(key, p))
    dir.replace(p, key.size(), config.preset_name());
  return dir;
}

fs::path checkpoint_path(const fs::path& run_dir, int64_t step) {
  return run_dir / "checkpoints" / fmt::format("step_{:06d}.safetensors", step);
}

TrainResult train(Engine& engine, Communicator& comm, const Config& config, const TrainOptions& options) {
  const int rank = comm.rank(), world = comm.world_size();
  const bool lead = rank == 0;
  const Checkpoint* resume = options.resume;
  if (resume) check_resume_config(resume->config, config, "resume");

  const int grad_accum = resolve_grad_accum(config, world);
  const int64_t iterations = config.get_int("iterations");
  const int64_t val_every = config.get_int("val_loss_every");
  const int64_t log_every = config.get_int("train_log_every");
  const int64_t checkpoint_every = config.get_int("checkpoint_every");
  PG_CHECK(iterations > 0, "iterations must be positive, got {}", iterations);
  PG_CHECK(val_every >= 0 && log_every >= 0 && checkpoint_every >= 0,
           "val_loss_every {}, train_log_every {} and checkpoint_every {} must be >= 0 (0 = off)", val_every,
           log_every, checkpoint_every);
  const bool ema_enabled = config.get_bool("ema_enabled");
  const optim::Schedule schedule = optim::Schedule::from_config(config);
  const bool write_files = !options.run_dir.empty();
  RunLog log(lead ? options.run_dir : fs::path(), resume != nullptr, lead && options.echo, lead && options.progress);
  if (lead && write_files) config.write_resolved(options.run_dir);

  // Validation data and the bpb byte tables.
  const Tokenizer tokenizer(config.get_string("tokenizer_path"));
  const int64_t vocab = config.get_int("vocab_size");
  PG_CHECK(tokenizer.vocab_size() <= vocab, "tokenizer {} has {} pieces, more than vocab_size {}",
           tokenizer.path().string(), tokenizer.vocab_size(), vocab);
  const ByteTables tables = tokenizer.byte_tables(vocab);
  const std::vector<uint16_t> val_tokens = load_eval_tokens(config.get_string("val_files"), config);
  const std::string heldout_glob = config.get_string("heldout_files");
  const std::vector<uint16_t> heldout_tokens =
      heldout_glob.empty() ? std::vector<uint16_t>() : load_eval_tokens(heldout_glob, config);
  const FlatEvalOptions eval_options = FlatEvalOptions::from_config(config, grad_accum, tokenizer.bos_id());
  eval_options.check_scores_something(val_tokens, world, "validation " + config.get_string("val_files"));
  if (!heldout_tokens.empty()) eval_options.check_scores_something(heldout_tokens, world, "held-out " + heldout_glob);

  // Weights, optimizer state, averages, data position and latches: fresh or from the checkpoint.
  ParamSet<float> params(engine.layout());
  std::optional<optim::Swa> swa;
  if (schedule.swa_enabled) swa.emplace(engine.layout());
  TrainBatches batches(config, rank, world, grad_accum, tokenizer.bos_id());
  TrainerState state;
  if (resume) {
    params.load_tensors(resume->tensors, "checkpoint");
    engine.load_params(params);
    engine.load_optimizer_state(resume->tensors, "checkpoint");
    if (swa) swa->load_state_tensors(resume->tensors, "checkpoint");
    batches.restore(resume->state.loader, "checkpoint");
    state = resume->state;
  } else {
    init_params(params, static_cast<uint64_t>(config.get_int("seed")));
    engine.load_params(params);
    if (ema_enabled) engine.init_ema();
    state.loader = batches.state();
  }
  engine.set_qat(state.qat);
  engine.set_looping(state.looping);

  log.line(fmt::format("model_params:{} backend:{}", engine.layout().count(), engine.backend_name()));
  log.line(fmt::format("world_size:{} grad_accum_steps:{}", world, grad_accum));
  log.line(fmt::format("train_batch_tokens:{} train_seq_len:{} iterations:{} max_wallclock_seconds:{:.3f}",
                       config.get_int("train_batch_tokens"), config.get_int("train_seq_len"), iterations,
                       schedule.cap_ms / 1000.0));
  log.line(fmt::format("seed:{} train_loader:{} val_tokens:{} heldout_tokens:{}", config.get_int("seed"),
                       config.get_string("train_loader"), val_tokens.size() - 1,
                       heldout_tokens.empty() ? 0 : heldout_tokens.size() - 1));
  if (resume)
    log.line(fmt::format("resumed:step:{} train_time:{:.0f}ms", state.step, state.train_ms),
             {{"event", "resume"}, {"step", state.step}, {"train_time_ms", state.train_ms}});

  TrainResult result;
  TrainTimer timer(state.train_ms);

  auto validate = [&](const std::string& label) {
    ValRecord v;
    v.step = state.step;
    v.train_ms = state.train_ms;
    v.val = evaluate_flat(engine, comm, val_tokens, tables, eval_options);
    if (!heldout_tokens.empty()) v.heldout = evaluate_flat(engine, comm, heldout_tokens, tables, eval_options);
    nlohmann::json m = {{"event", label}, {"step", v.step}, {"train_time_ms", v.train_ms}};
    m.update(eval_json(v.val, "val"));
    if (v.heldout) m.update(eval_json(*v.heldout, "heldout"));
    if (label == "val") {
      log.line(val_log_line(v.step, iterations, v.val.val_loss, v.val.val_bpb, v.train_ms), m);
      if (v.heldout)
        log.line(fmt::format("step:{}/{} heldout_loss:{:.4f} heldout_bpb:{:.4f}", v.step, iterations,
                             v.heldout->val_loss, v.heldout->val_bpb));
    } else {
      log.line(fmt::format("DIAGNOSTIC {} val_loss:{:.4f} val_bpb:{:.4f} eval_time:{:.0f}ms", label, v.val.val_loss,
                           v.val.val_bpb, 1000.0 * v.val.seconds),
               m);
      if (v.heldout)
        log.line(fmt::format("DIAGNOSTIC {} heldout_loss:{:.4f} heldout_bpb:{:.4f}", label, v.heldout->val_loss,
                             v.heldout->val_bpb));
    }
    return v;
  };

  int64_t last_checkpoint = resume ? state.step : -1;
  auto checkpoint = [&] {
    if (!write_files || last_checkpoint == state.step) return;
    TensorMap tensors = engine.optimizer_state();  // a collective under Parallel Muon: every rank calls it
    last_checkpoint = state.step;
    if (!lead) return;
    ParamSet<float> live(engine.layout());
    engine.store_params(live);
    TensorMap all = live.to_tensors();
    for (const std::string& name : tensors.names()) all.set(name, std::move(tensors.get(name)));
    if (swa) {
      TensorMap s = swa->state_tensors();
      for (const std::string& name : s.names()) all.set(name, std::move(s.get(name)));
    }
    const fs::path path = checkpoint_path(options.run_dir, state.step);
    save_checkpoint(path, config, state, all);
    log.line(fmt::format("checkpoint:{} step:{}", path.string(), state.step),
             {{"event", "checkpoint"}, {"step", state.step}, {"path", path.string()}});
  };

  // Pipelined steps (Engine::submit_train_step): where nothing between two steps needs the device to
  // stop (a validation, a checkpoint, an SWA snapshot, the last step of the iterations, the last
  // seconds before the cap), the next step is submitted before the current one is collected, so the
  // host's work between steps (the next batch and its upload, the launch, the logs, the stop rule)
  // runs while the device works instead of leaving it idle. The next step's schedules (LR, looping,
  // late QAT) are evaluated at the training time at which it is predicted to start: the current step's
  // start plus the last step's duration. How near the cap the run is, the one time-dependent part of
  // the decision, is all-reduced with the stop rule. With several ranks that all-reduce cannot be a
  // host collective while a step is pending (on NCCL it would wait behind that step on the engine's
  // stream): each step carries the stop rule's flags as they stood at its submission
  // (StepControl::agree_max), the engine reduces them behind the step, and a step collected while the
  // next one is pending is judged by them, with the near-cap horizon widened by the steps they lag.
  const bool lookahead = config.get_bool("train_lookahead");
  // Near the cap: within this many of the last step's durations plus this margin every step waits for
  // the one before, so that the stop rule sees each step's end before the next one is submitted.
  constexpr double kNearCapSteps = 4.0, kNearCapMarginMs = 1000.0;
  // Flags carried by a step were taken at its submission: up to two steps before the end of the step
  // that is collected when they are read.
  constexpr double kCarriedFlagLagSteps = 2.0;
  double last_step_ms = 0.0;
  // The stop rule's flags at training time t: the cap is reached; it is near (within `steps` times the
  // last step's duration plus the margin).
  auto cap_flags = [&](double t, double steps) -> std::array<double, 2> {
    return {schedule.reached_cap(t) ? 1.0 : 0.0,
            schedule.reached_cap(t + steps * last_step_ms + kNearCapMarginMs) ? 1.0 : 0.0};
  };
  struct Submitted {
    StepControl control;
    int64_t tokens = 0;      // all ranks'
    nlohmann::json loader;   // the loader's state after the step's batches
    bool qat = false, looping = false;
    double submit_ms = 0.0;  // training time at submission
    double start_ms = 0.0;   // ... at which the device starts it (predicted while the step before runs)
  };
  auto submit = [&](int64_t step, double start_ms) {
    const double lr_scale = schedule.lr_scale(step, start_ms);
    if (!state.looping && schedule.looping_due(step, start_ms)) {
      state.looping = true;
      engine.set_looping(true);
      log.line(fmt::format("layer_loop:enabled step:{} frac:{:.3f}", step, schedule.training_fraction(step, start_ms)),
               {{"event", "layer_loop"}, {"step", step}});
    }
    if (!state.qat && schedule.late_qat_due(lr_scale)) {
      state.qat = true;
      engine.set_qat(true);
      log.line(fmt::format("late_qat:enabled step:{} scale:{:.4f}", step, lr_scale),
               {{"event", "late_qat"}, {"step", step}, {"lr_scale", lr_scale}});
    }
    Submitted s;
    s.control.step = step;
    s.control.lr_scale = lr_scale;
    s.control.muon_momentum = schedule.muon_momentum(step);
    s.control.update_ema = ema_enabled;
    if (schedule.has_cap()) s.control.agree_max = cap_flags(timer.elapsed_ms(), kNearCapSteps + kCarriedFlagLagSteps);
    const std::vector<Batch> micro = batches.next_step();
    for (const Batch& b : micro) s.tokens += b.tokens();
    s.tokens *= world;
    s.submit_ms = timer.elapsed_ms();
    s.start_ms = start_ms;
    engine.submit_train_step(micro, s.control);
    s.loader = batches.state();
    s.qat = state.qat;
    s.looping = state.looping;
    return s;
  };
  // Whether the step after the one just submitted may be submitted before it is collected: `next` steps
  // will then be done, and nothing that happens after them may need the device idle.
  bool near_cap = schedule.has_cap();  // all ranks agree that the cap is far: known after the first step
  auto may_look_ahead = [&](int64_t next, double lr_scale) {
    return lookahead && !near_cap && next < iterations && state.stop_after_step < 0 &&
           !(val_every > 0 && next % val_every == 0) && !(checkpoint_every > 0 && next % checkpoint_every == 0) &&
           !(swa && schedule.swa_snapshot_due(next, lr_scale)) &&
           !(options.stop_after_steps > 0 && next >= options.stop_after_steps);
  };
  std::optional<Submitted> ahead;

  try {
    PendingCalls drain(engine);  // a step still pending when an error leaves the loop
    while (true) {
      const bool last = state.step >= iterations || (state.stop_after_step >= 0 && state.step >= state.stop_after_step);
      const bool validates = last || (val_every > 0 && state.step % val_every == 0);
      PG_CHECK(!ahead || !validates, "trainer: step {} was submitted ahead of a validation", state.step);
      if (validates) {
        timer.pause();
        state.train_ms = timer.elapsed_ms();
        result.validations.push_back(validate("val"));
        timer.resume();
      }
      if (last) {
        if (state.step < iterations)
          log.line(fmt::format("stopping_early: wallclock_cap train_time:{:.0f}ms step:{}/{}", state.train_ms,
                               state.step, iterations),
                   {{"event", "stop"}, {"step", state.step}, {"train_time_ms", state.train_ms}});
        break;
      }

      Submitted cur = ahead ? std::move(*ahead) : submit(state.step, timer.elapsed_ms());
      ahead.reset();
      if (may_look_ahead(state.step + 1, cur.control.lr_scale))
        ahead = submit(state.step + 1, std::max(timer.elapsed_ms(), cur.start_ms + last_step_ms));

      const StepResult r = engine.collect_train_step();
      PG_CHECK(std::isfinite(r.loss), "step {}: training loss is {}: the run diverged", state.step + 1, r.loss);
      ++state.step;
      const double end_ms = timer.elapsed_ms();
      last_step_ms = end_ms - cur.start_ms;
      if (ahead) ahead->start_ms = std::max(ahead->submit_ms, end_ms);  // queued behind this step
      if (swa && schedule.swa_snapshot_due(state.step, cur.control.lr_scale)) {
        ParamSet<float> live(engine.layout());
        engine.store_params(live);
        swa->add(live);
      }
      state.loader = cur.loader;
      state.train_ms = end_ms;

      StepRecord rec{state.step,    r.loss,   r.grad_norm,     cur.control.lr_scale, cur.control.muon_momentum,
                     cur.qat,       cur.looping, state.train_ms};
      result.steps.push_back(rec);
      const double tokens_per_s = static_cast<double>(state.step) * static_cast<double>(cur.tokens) /
                                  std::max(state.train_ms / 1000.0, 1e-9);
      if (log_every > 0 && (state.step <= 10 || state.step % log_every == 0 || state.stop_after_step >= 0))
        log.line(train_log_line(state.step, iterations, r.loss, state.train_ms),
                 {{"event", "train"},
                  {"step", state.step},
                  {"train_loss", r.loss},
                  {"train_time_ms", state.train_ms},
                  {"step_avg_ms", state.train_ms / static_cast<double>(state.step)},
                  {"tokens_per_s", tokens_per_s},
                  {"lr_scale", cur.control.lr_scale},
                  {"grad_norm", r.grad_norm},
                  {"muon_momentum", cur.control.muon_momentum},
                  {"qat", cur.qat},
                  {"looping", cur.looping}});
      log.progress(fmt::format("step {}/{} | train_loss {:.4f} | {:.0f} tok/s | train {:.1f}s | lr x{:.3f}", state.step,
                               iterations, r.loss, tokens_per_s, state.train_ms / 1000.0, cur.control.lr_scale));

      // The stop rule: the first step at which any rank reached the cap is the last one. A step already
      // submitted then (possible only if a step took several times the last one's duration) has run
      // too: it becomes the last one, and the log says so. With several ranks and a step pending, the
      // flags this step carried stand in for a host collective (see above).
      if (schedule.has_cap()) {
        std::array<double, 2> flags = r.agreed;
        if (!ahead || world == 1) {
          flags = cap_flags(state.train_ms, kNearCapSteps);
          comm.all_reduce_host(flags.data(), flags.size(), ReduceOp::Max);
        }
        near_cap = flags[1] > 0.0;
        if (state.stop_after_step < 0 && flags[0] > 0.0) {
          state.stop_after_step = ahead ? state.step + 1 : state.step;
          if (ahead)
            log.line(fmt::format("cap reached at step {} with step {} already submitted: it is the last one",
                                 state.step, state.step + 1),
                     {{"event", "cap_after_submission"}, {"step", state.step}});
        }
      }
      if (checkpoint_every > 0 && state.step % checkpoint_every == 0) {
        timer.pause();
        checkpoint();
        timer.resume();
      }
      if (options.stop_after_steps > 0 && state.step >= options.stop_after_steps) {
        log.line(fmt::format("stopped:step:{}", state.step));
        result.stopped_early = true;
        result.final_state = state;
        return result;
      }
    }
    checkpoint();

    // The run's output weights: the EMA, or the SWA average of at least two snapshots, else the live weights.
    ParamSet<float> out(engine.layout());
    engine.store_params(out);
    if (ema_enabled) {
      engine.store_ema(out);
      result.averaging = "ema";
    } else if (swa && swa->ready()) {
      swa->average_into(out);
      result.averaging = "swa";
      log.line(fmt::format("swa:applying count:{}", swa->count()));
    }
    if (!result.averaging.empty()) {
      engine.load_params(out);
      result.averaged = validate("post_" + result.averaging);
    }
    if (lead && write_files) {
      save_safetensors(options.run_dir / "final_model.safetensors", out.to_tensors(),
                       {{"format", "pgolf-model"}, {"averaging", result.averaging}, {"config", config.to_toml()}});
      log.line(fmt::format("final_model:{} averaging:{}", (options.run_dir / "final_model.safetensors").string(),
                           result.averaging.empty() ? "none" : result.averaging));
    }
    result.final_params = std::move(out);
  } catch (const std::exception& e) {
    log.line(fmt::format("error: {}", e.what()), {{"event", "error"}, {"step", state.step}, {"message", e.what()}});
    throw;
  }
  result.final_state = state;
  return result;
}

}  // namespace pgolf
