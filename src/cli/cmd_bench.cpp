// pgolf bench: throughput of a preset's training step on an engine (whole optimizer steps: forward,
// backward, optimizer, EMA), of the optimizer step alone, and of the evaluation forward (token_losses
// on T-windows, what sliding and TTT scoring run). Random tokens and N(0, 0.02²) weights: the timing
// does not depend on them, but nothing runs on zeros. MFU = tokens/s × (6·N + 6·L·d·T) / 989e12
// (ENGINEERING §5; L = the layers the plan runs). With --looping (s1560's depth recurrence, on for
// the last 65 % of its training) the repeated layers run again: N counts their matrices once more
// per extra pass and L is the number of virtual layers.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <map>

#include "cli/commands.h"
#include "cli/launch.h"
#include "core/error.h"
#include "core/rng.h"
#include "dist/communicator.h"
#include "model/engine_factory.h"
#ifdef PGOLF_HAVE_CUDA
#include <cuda_runtime.h>

#include "backend/cuda/check.h"
#include "backend/cuda/cuda_engine.h"
#include "backend/cuda/device.h"
#include "backend/cuda/kernel_profile.h"
#endif

namespace pgolf::cli {

namespace {

struct BenchOptions {
  PresetOptions preset;
  std::string device = "cuda";
  int64_t seq_len = 0;       // 0 = the preset's train_seq_len
  int64_t batch_tokens = 0;  // 0 = one GPU's share of the preset's batch (train_batch_tokens / 8)
  int steps = 10;
  int warmup = 3;
  bool json = false;
  bool profile = false;
  int top = 10;  // kernels listed by --profile
  bool deterministic = false;
  bool looping = false;
  NprocOption nproc;  // several ranks: each times its steps (with the gradient all-reduce), rank 0 reports
};

Batch random_batch(int64_t rows, int64_t seq_len, int vocab, Rng& rng) {
  Batch b;
  b.rows = rows;
  b.seq_len = seq_len;
  for (int64_t i = 0; i < rows * seq_len; ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  return b;
}

// Seconds per call of fn over `reps` calls after `warmup` (each call ends with its results on the host).
template <typename F>
double seconds_per_call(int warmup, int reps, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn(i);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) fn(warmup + i);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

void run_bench(const BenchOptions& o) {
  Config cfg = o.preset.resolve();
  const ModelConfig mc = ModelConfig::from_config(cfg);
  const int64_t T = o.seq_len > 0 ? o.seq_len : cfg.get_int("train_seq_len");
  // --one-gpu has already divided the configured batch by 8.
  const int64_t tokens =
      o.batch_tokens > 0 ? o.batch_tokens : cfg.get_int("train_batch_tokens") / (o.preset.one_gpu ? 1 : 8);
  PG_CHECK(T > 0 && tokens > 0 && tokens % T == 0, "bench: --batch-tokens {} must be a positive multiple of --seq-len {}",
           tokens, T);
  PG_CHECK(o.steps > 0 && o.warmup >= 0, "bench: --steps must be positive and --warmup non-negative");
  cfg.set("train_seq_len", T);
  const bool cuda = o.device == "cuda";
  PG_CHECK(!o.profile || cuda, "bench: --profile needs --device cuda");

  if (auto status = o.nproc.launch_ranks("pgolf bench", o.device)) return exit_command(*status);
  const ProcessGroup group = join_process_group("pgolf bench", o.device);
  Communicator* comm = group.comm.get();
#ifdef PGOLF_HAVE_CUDA
  size_t free_before = 0, device_total = 0;
  if (cuda) PG_CUDA_CHECK(cudaMemGetInfo(&free_before, &device_total));
#endif
  EngineOptions eo;
  eo.max_tokens = tokens;
  eo.deterministic = o.deterministic;
  std::unique_ptr<Engine> engine = make_engine(cfg, *comm, o.device, eo);
  ParamSet<float> params(engine->layout());
  Rng rng(2);
  for (size_t i = 0; i < params.layout().size(); ++i)
    for (float& x : params[i]) x = static_cast<float>(0.02 * rng.normal());
  engine->load_params(params);
  engine->init_ema();
  PG_CHECK(!o.looping || mc.num_loops > 0, "bench: --looping needs a preset with num_loops > 0 ({} has none)",
           cfg.preset_name());
  engine->set_looping(o.looping);
  const Batch batch = random_batch(tokens / T, T, mc.vocab_size, rng);

  int64_t step_index = 0;
  const std::span<const Batch> step_batch(&batch, 1);
  auto train = [&](int) { engine->train_step(step_batch, {step_index++, 1.0, 0.95, true}); };
  for (int i = 0; i < o.warmup; ++i) train(i);
  // Steps as the trainer runs them (train_lookahead): each submitted before the one before it is
  // collected, so the host's work between steps overlaps the device's. Timed from the first
  // submission to the collection of `steps` steps, one more in flight. Then the same steps one at a
  // time, for comparison (measured second: a GPU warming up runs slower, which favours the first).
  engine->submit_train_step(step_batch, {step_index++, 1.0, 0.95, true});
  const double step_s = seconds_per_call(0, o.steps, [&](int) {
    engine->submit_train_step(step_batch, {step_index++, 1.0, 0.95, true});
    engine->collect_train_step();
  });
  engine->collect_train_step();
  const double sync_step_s = seconds_per_call(0, o.steps, train);
  std::vector<float> nll;
  const double eval_s = seconds_per_call(std::max(o.warmup, 1), o.steps, [&](int) { engine->token_losses(batch, nll); });

  const ModelConfig::LayerPlan plan = mc.layer_plan(o.looping);
  const int64_t layers = static_cast<int64_t>(plan.encoder.size() + plan.decoder.size());
  // The matrices of one block (c_q, c_k, c_v, proj, fc, mlp proj), run once more per extra pass.
  const double block_matrices = static_cast<double>(mc.model_dim) * (2.0 * mc.q_dim() + 2.0 * mc.kv_dim()) +
                                2.0 * mc.model_dim * static_cast<double>(mc.mlp_hidden);
  const double n_params = static_cast<double>(engine->layout().count()) +
                          static_cast<double>(layers - mc.num_layers) * block_matrices;
  const double flops_per_token =
      6.0 * n_params + 6.0 * static_cast<double>(layers) * mc.model_dim * static_cast<double>(T);
  const double tokens_per_s = static_cast<double>(tokens) / step_s;
  const double mfu = tokens_per_s * flops_per_token / 989e12;
  const double eval_tokens_per_s = static_cast<double>(tokens) / eval_s;

  nlohmann::json j;
  j["preset"] = cfg.preset_name();
  j["device"] = o.device;
  j["world_size"] = comm->world_size();
  j["params"] = engine->layout().count();
  j["layers"] = layers;
  j["looping"] = o.looping;
  j["seq_len"] = T;
  j["tokens_per_step"] = tokens;
  j["steps"] = o.steps;
  j["warmup"] = o.warmup;
  j["ms_per_step"] = step_s * 1e3;
  j["ms_per_step_synchronous"] = sync_step_s * 1e3;  // each step collected before the next is submitted
  j["tokens_per_s"] = tokens_per_s;
  j["mfu"] = mfu;
  j["eval_ms"] = eval_s * 1e3;
  j["eval_tokens_per_s"] = eval_tokens_per_s;
#ifdef PGOLF_HAVE_CUDA
  std::vector<cuda::KernelTime> kernels;
  std::string profile_note;
  if (cuda) {
    auto& ce = static_cast<cuda::CudaEngine&>(*engine);
    const double opt_s = seconds_per_call(1, o.steps, [&](int) { ce.optimizer_step({step_index++, 1.0, 0.95, true}); });
    size_t free_after = 0;
    PG_CUDA_CHECK(cudaMemGetInfo(&free_after, &device_total));
    j["gpu"] = cuda::device_info(0).name;
    j["optimizer_ms"] = opt_s * 1e3;
    j["device_memory_gib"] = static_cast<double>(free_before - free_after) / 1073741824.0;
    j["graphs"] = ce.graphs_captured();
    if (o.profile) {
      cuda::KernelProfile profile;
      if (profile.start()) {
        const int reps = 3;
        for (int i = 0; i < reps; ++i) train(0);
        kernels = profile.stop();
        double sum = 0;
        for (const auto& k : kernels) sum += k.total_ms;
        j["kernel_ms_per_step"] = sum / reps;
        std::map<std::string, double> by_category;
        for (const auto& k : kernels) by_category[cuda::kernel_category(k.name)] += k.total_ms / reps;
        for (const auto& [category, ms] : by_category) j["kernel_categories_ms"][category] = ms;
        for (size_t i = 0; i < kernels.size() && i < static_cast<size_t>(o.top); ++i)
          j["kernels"].push_back({{"name", kernels[i].name},
                                  {"ms_per_step", kernels[i].total_ms / reps},
                                  {"share", kernels[i].total_ms / sum},
                                  {"calls_per_step", kernels[i].calls / reps}});
        // Device idle time inside the profiled steps (and between them: the host's part of a step).
        const cuda::IdleSummary& idle = profile.idle();
        j["idle_ms_per_step"] = idle.total_ms / reps;
        j["idle_gaps_per_step"] = static_cast<double>(idle.gaps) / reps;
        for (size_t i = 0; i < idle.pairs.size() && i < 10; ++i)
          j["idle"].push_back({{"before", idle.pairs[i].before},
                               {"after", idle.pairs[i].after},
                               {"ms_per_step", idle.pairs[i].total_ms / reps},
                               {"max_us", idle.pairs[i].max_us},
                               {"count_per_step", static_cast<double>(idle.pairs[i].count) / reps}});
        for (const cuda::IdleGap& g : idle.categories)
          j["idle_by_category"].push_back({{"before", g.before},
                                           {"after", g.after},
                                           {"ms_per_step", g.total_ms / reps},
                                           {"count_per_step", static_cast<double>(g.count) / reps}});
      } else {
        profile_note = profile.why();
        j["profile_unavailable"] = profile_note;
      }
    }
  }
#endif
  if (!group.lead()) return;
  if (o.json) {
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("bench {} on {}{}: {} parameters, {} layers{}, {} tokens per step ({} x {}), {} steps after {} warm-up\n",
             j["preset"].get<std::string>(), o.device, j.contains("gpu") ? " (" + j["gpu"].get<std::string>() + ")" : "",
             engine->layout().count(), layers, o.looping ? " (looping)" : "", tokens, tokens / T, T, o.steps, o.warmup);
  if (comm->world_size() > 1)
    fmt::print("  {} ranks: the figures are rank 0's, per GPU, each step with its gradient all-reduce\n",
               comm->world_size());
  fmt::print("  train step      {:9.2f} ms/step  {:8.3f} M tokens/s  MFU {:5.1f} %  ({:.2f} ms one step at a time)\n",
             step_s * 1e3, tokens_per_s * 1e-6, 100.0 * mfu, sync_step_s * 1e3);
  if (j.contains("optimizer_ms")) fmt::print("  optimizer step  {:9.2f} ms (clip, AdamW + Muon, EMA)\n", j["optimizer_ms"].get<double>());
  fmt::print("  eval forward    {:9.2f} ms/batch {:8.3f} M tokens/s\n", eval_s * 1e3, eval_tokens_per_s * 1e-6);
  if (j.contains("device_memory_gib"))
    fmt::print("  device memory   {:9.2f} GiB (parameters, optimizer state, EMA, activations)\n",
               j["device_memory_gib"].get<double>());
  if (j.contains("kernels")) {
    fmt::print("  top kernels of a training step ({:.2f} ms of kernel time", j["kernel_ms_per_step"].get<double>());
    for (const auto& [category, ms] : j["kernel_categories_ms"].items())
      fmt::print("; {} {:.2f}", category, ms.get<double>());
    fmt::print("):\n");
    for (const auto& k : j["kernels"])
      fmt::print("    {:<72} {:8.3f} ms {:5.1f} % {:4} calls\n", k["name"].get<std::string>(),
                 k["ms_per_step"].get<double>(), 100.0 * k["share"].get<double>(), k["calls_per_step"].get<long>());
  }
  if (j.contains("idle_ms_per_step")) {
    fmt::print("  device idle {:.2f} ms per step in {:.0f} gaps; the largest, by the work before and after:\n",
               j["idle_ms_per_step"].get<double>(), j["idle_gaps_per_step"].get<double>());
    for (const auto& g : j["idle"])
      fmt::print("    {:8.3f} ms {:6.1f} per step, max {:7.1f} us  {} -> {}\n", g["ms_per_step"].get<double>(),
                 g["count_per_step"].get<double>(), g["max_us"].get<double>(), g["before"].get<std::string>(),
                 g["after"].get<std::string>());
  }
  if (j.contains("profile_unavailable"))
    fmt::print("  kernel profile unavailable: {}\n", j["profile_unavailable"].get<std::string>());
}

}  // namespace

void register_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "time a preset's training step, optimizer step and evaluation forward");
  o->preset.add_to(cmd, true);
  cmd->add_option("--device", o->device, "cuda (default) or cpu")->check(CLI::IsMember({"cuda", "cpu"}));
  cmd->add_option("--seq-len", o->seq_len, "sequence length T (default: the preset's train_seq_len)");
  cmd->add_option("--batch-tokens", o->batch_tokens,
                  "tokens per step, a multiple of T (default: train_batch_tokens / 8, one GPU's share)");
  cmd->add_option("--steps", o->steps, "timed steps (default 10)");
  cmd->add_option("--warmup", o->warmup, "untimed steps first (default 3; the first ones capture the CUDA graphs)");
  cmd->add_flag("--json", o->json, "one JSON object instead of the table");
  cmd->add_flag("--profile", o->profile,
                "CUDA: the kernels that take the most time in a training step (CUPTI), and the time per kind "
                "(gemm, attention, other)");
  cmd->add_option("--top", o->top, "kernels listed by --profile (default 10)")->check(CLI::PositiveNumber);
  cmd->add_flag("--deterministic", o->deterministic, "CUDA: the deterministic backward kernels");
  cmd->add_flag("--looping", o->looping, "depth recurrence on (presets with num_loops > 0, e.g. s1560)");
  o->nproc.add_to(cmd);
  cmd->callback([o] { run_bench(*o); });
}

}  // namespace pgolf::cli
