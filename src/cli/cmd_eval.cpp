// pgolf eval: evaluate a checkpoint or an artifact (dequantized as the references do) on the
// validation shards in one or several modes — flat, sliding windows, score-first TTT (SGD / AdamW),
// per-document LoRA TTT, phased TTT — and print val_loss / val_bpb with the time of each phase, in
// the reference log style or as one JSON object. TTT modes each start from the loaded weights.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>

#include "cli/commands.h"
#include "cli/launch.h"
#include "core/safetensors.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "dist/communicator.h"
#include "eval/flat.h"
#include "eval/modes.h"
#include "quant/artifact.h"
#include "quant/pack.h"
#include "model/engine_factory.h"
#ifdef PGOLF_HAVE_CUDA
#include "backend/cuda/cuda_engine.h"
#include "backend/cuda/kernel_profile.h"
#endif

namespace pgolf::cli {

namespace {

struct EvalArgs {
  PresetOptions preset;
  std::string artifact, checkpoint, val, tokenizer;
  std::vector<std::string> modes;
  std::string device = "auto";
  bool as_json = false;
  bool profile = false;
  int top = 15;  // kernels listed by --profile
  NprocOption nproc;
};

// The kernels that took the most GPU time in one mode's evaluation (CUPTI), with their sum: set
// against the mode's wall time, the sum says how much of it the GPU was busy.
struct ModeProfile {
#ifdef PGOLF_HAVE_CUDA
  cuda::KernelProfile cupti;
  cuda::CudaEngine* engine = nullptr;
  cuda::CudaEngine::HostCounters before;  // the engine's host counters when the mode started
#endif
  bool on = false;
  std::string why;

  void start(bool wanted, const std::string& device, Engine& eval_engine) {
    on = false;
    if (!wanted) return;
#ifdef PGOLF_HAVE_CUDA
    PG_CHECK(device == "cuda", "eval: --profile needs --device cuda");
    engine = dynamic_cast<cuda::CudaEngine*>(&eval_engine);
    if (engine) before = engine->host_counters();
    on = cupti.start();
    if (!on) why = cupti.why();
#else
    (void)device;
    (void)eval_engine;
    PG_CHECK(false, "eval: --profile needs the CUDA build");
#endif
  }
  nlohmann::json stop(bool print, int top) {
    nlohmann::json j;
    if (!on) {
      if (!why.empty()) j["profile_unavailable"] = why;
      return j;
    }
#ifdef PGOLF_HAVE_CUDA
    const std::vector<cuda::KernelTime> kernels = cupti.stop();
    double sum = 0;
    long calls = 0;
    for (const auto& k : kernels) sum += k.total_ms, calls += k.calls;
    j["kernel_ms"] = sum;
    j["kernel_calls"] = calls;
    if (print) fmt::print("  GPU kernels: {:.1f} ms in {} launches; the most time:\n", sum, calls);
    for (size_t i = 0; i < kernels.size() && i < static_cast<size_t>(top); ++i) {
      j["kernels"].push_back({{"name", kernels[i].name}, {"ms", kernels[i].total_ms}, {"calls", kernels[i].calls}});
      if (print)
        fmt::print("    {:9.1f} ms {:5.1f} % {:8d}  {}\n", kernels[i].total_ms, 100.0 * kernels[i].total_ms / sum,
                   kernels[i].calls, kernels[i].name);
    }
    const cuda::IdleSummary& idle = cupti.idle();
    j["idle_ms"] = idle.total_ms;
    j["idle_gaps"] = idle.gaps;
    if (print) fmt::print("  device idle {:.1f} ms in {} gaps; the largest, by the work before and after:\n", idle.total_ms, idle.gaps);
    for (size_t i = 0; i < idle.pairs.size() && i < 5; ++i) {
      const cuda::IdleGap& g = idle.pairs[i];
      j["idle"].push_back({{"before", g.before}, {"after", g.after}, {"ms", g.total_ms}, {"count", g.count}});
      if (print) fmt::print("    {:9.1f} ms {:8d}  {} -> {}\n", g.total_ms, g.count, g.before, g.after);
    }
    if (print) fmt::print("  by kind of work (gemm, attention, other kernels, copies):\n");
    for (const cuda::IdleGap& g : idle.categories) {
      j["idle_by_category"].push_back({{"before", g.before}, {"after", g.after}, {"ms", g.total_ms}, {"count", g.count}});
      if (print)
        fmt::print("    {:9.1f} ms {:8d}  {:.2f} us each  {} -> {}\n", g.total_ms, g.count,
                   1e3 * g.total_ms / static_cast<double>(g.count), g.before, g.after);
    }
    if (engine) {
      const cuda::CudaEngine::HostCounters now = engine->host_counters();
      const long eager = now.graphs.eager - before.graphs.eager, captured = now.graphs.captured - before.graphs.captured,
                 replayed = now.graphs.replayed - before.graphs.replayed;
      const double capture_s = now.graphs.capture_seconds - before.graphs.capture_seconds;
      const size_t plans = now.gemm_plans - before.gemm_plans;
      const double plan_s = now.gemm_plan_seconds - before.gemm_plan_seconds;
      j["graph_calls"] = {{"eager", eager}, {"captured", captured}, {"replayed", replayed}, {"capture_seconds", capture_s}};
      j["gemm_plans"] = {{"built", plans}, {"seconds", plan_s}};
      if (print)
        fmt::print("  step calls: {} eager, {} captured into graphs ({:.0f} ms recording and instantiating), {} replayed; "
                   "{} GEMM plans built ({:.0f} ms)\n",
                   eager, captured, 1e3 * capture_s, replayed, plans, 1e3 * plan_s);
    }
#endif
    return j;
  }
};

struct LoadedModel {
  Config config;
  TensorMap weights;  // under the reference parameter names
  std::string source;
  double load_seconds = 0.0, dequantize_seconds = 0.0;
};

// The configuration (the artifact's own unless --preset is given, then every --set) and the weights.
LoadedModel load_model(const EvalArgs& a) {
  PG_CHECK(a.artifact.empty() != a.checkpoint.empty(), "pgolf eval: give exactly one of --artifact and --checkpoint");
  LoadedModel m;
  auto t0 = EvalClock::now();
  if (!a.artifact.empty()) {
    const Artifact art = read_artifact(a.artifact);  // decompressed and verified
    m.load_seconds = seconds_since(t0);
    m.config = a.preset.preset.empty() ? Config::from_toml(art.config_toml, a.artifact) : Config::load(a.preset.preset);
    a.preset.apply(m.config);
    t0 = EvalClock::now();
    m.weights = artifact_weights(art);
    m.dequantize_seconds = seconds_since(t0);
    m.source = a.artifact;
  } else {
    PG_CHECK(!a.preset.preset.empty(), "pgolf eval --checkpoint {}: --preset is required", a.checkpoint);
    m.config = a.preset.resolve();
    m.weights = select_parameters(m.config, load_safetensors(a.checkpoint), a.checkpoint);
    m.load_seconds = seconds_since(t0);
    m.source = a.checkpoint;
  }
  return m;
}

double or_nan(const EvalOutcome& o, double (EvalOutcome::*f)() const) {
  return o.tokens() > 0 ? (o.*f)() : std::numeric_limits<double>::quiet_NaN();
}

void print_outcome(const EvalOutcome& o) {
  const double total_ms = 1000.0 * (o.score_seconds + o.train_seconds);
  fmt::print("{}{} val_loss:{:.8f} val_bpb:{:.8f} tokens:{} bytes:{} eval_time:{:.0f}ms score_time:{:.0f}ms "
             "train_time:{:.0f}ms\n",
             o.legal ? "" : std::string(kNotLegalLabel) + " ", o.mode, or_nan(o, &EvalOutcome::val_loss),
             or_nan(o, &EvalOutcome::val_bpb), o.tokens(), o.bytes(), total_ms, 1000.0 * o.score_seconds,
             1000.0 * o.train_seconds);
  fmt::print("  {}{}\n", o.note, o.unscored() > 0 ? fmt::format(" unscored:{}", o.unscored()) : std::string());
}

nlohmann::json outcome_json(const EvalOutcome& o) {
  auto num = [](double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); };
  nlohmann::json j = {{"mode", o.mode},
                      {"val_loss", num(or_nan(o, &EvalOutcome::val_loss))},
                      {"val_bpb", num(or_nan(o, &EvalOutcome::val_bpb))},
                      {"tokens", o.tokens()},
                      {"bytes", o.bytes()},
                      {"rescored", o.rescored},
                      {"unscored", o.unscored()},
                      {"score_seconds", o.score_seconds},
                      {"train_seconds", o.train_seconds},
                      {"legal", o.legal},
                      {"complete", o.complete},
                      {"note", o.note}};
  if (!o.legal) j["label"] = kNotLegalLabel;
  if (!o.batches.empty()) {
    nlohmann::json batches = nlohmann::json::array();
    for (const BatchTiming& b : o.batches)
      batches.push_back({{"index", b.index}, {"docs", b.docs}, {"calls", b.calls}, {"tokens", b.tokens},
                         {"seconds", b.seconds}});
    j["batches"] = batches;  // rank 0's
  }
  return j;
}

void run_eval(const EvalArgs& a) {
  const std::string device = resolve_device(a.device);
  if (auto status = a.nproc.launch_ranks("pgolf eval", device)) return exit_command(*status);
  LoadedModel m = load_model(a);
  const Config& cfg = m.config;
  const ModelConfig model = ModelConfig::from_config(cfg);
  ParamSet<float> params{ParamLayout(param_specs(model))};
  params.load_tensors(m.weights, m.source);
  m.weights = TensorMap();

  std::vector<std::string> modes = a.modes.empty() ? cfg.get_string_list("eval_modes") : a.modes;
  for (const auto& mode : modes) check_eval_mode(mode);
  const Tokenizer tokenizer(a.tokenizer.empty() ? cfg.get_string("tokenizer_path") : a.tokenizer);
  PG_CHECK(tokenizer.vocab_size() <= model.vocab_size, "tokenizer {} has {} pieces, the model's vocabulary is {}",
           tokenizer.path().string(), tokenizer.vocab_size(), model.vocab_size);
  const ByteTables tables = tokenizer.byte_tables(model.vocab_size);
  auto t0 = EvalClock::now();
  const std::vector<uint16_t> tokens = load_eval_tokens(a.val.empty() ? cfg.get_string("val_files") : a.val, cfg);
  const double tokens_seconds = seconds_since(t0);
  const EvalInputs inputs{tokens, &tables, tokenizer.bos_id(), resolve_eval_seq_len(cfg)};

  const ProcessGroup group = join_process_group("pgolf eval", device);
  Communicator& comm = *group.comm;
  std::unique_ptr<Engine> engine_ptr = make_engine(cfg, comm, device);
  Engine& engine = *engine_ptr;
  engine.set_looping(model.has_looping());  // the finished model runs its looped plan
  const bool report = group.lead();  // every rank scores its share; rank 0 prints
  if (report && !a.as_json)
    fmt::print("eval {} ({}, {} engine): {} validation targets, T_eval {}, load:{:.0f}ms dequantize:{:.0f}ms "
               "val_tokens:{:.0f}ms\n",
               m.source, cfg.preset_name(), engine.backend_name(), tokens.size() - 1, inputs.seq_len,
               1000.0 * m.load_seconds, 1000.0 * m.dequantize_seconds, 1000.0 * tokens_seconds);
  nlohmann::json results = nlohmann::json::array();
  ModeProfile profile;
  for (const auto& mode : modes) {
    engine.load_params(params);  // every mode starts from the loaded weights
    profile.start(a.profile, device, engine);
    const EvalOutcome o = run_eval_mode(mode, engine, comm, cfg, inputs);
    if (!report) {
      profile.stop(false, a.top);
      continue;
    }
    if (!a.as_json) print_outcome(o);
    const nlohmann::json kernels = profile.stop(!a.as_json, a.top);
    if (a.as_json) {
      nlohmann::json j = outcome_json(o);
      if (!kernels.empty()) j["profile"] = kernels;
      results.push_back(j);
    }
  }
  if (report && a.as_json)
    fmt::print("{}\n", nlohmann::json{{"source", m.source},
                                      {"preset", cfg.preset_name()},
                                      {"backend", engine.backend_name()},
                                      {"val_targets", tokens.size() - 1},
                                      {"seq_len", inputs.seq_len},
                                      {"load_seconds", m.load_seconds},
                                      {"dequantize_seconds", m.dequantize_seconds},
                                      {"val_tokens_seconds", tokens_seconds},
                                      {"modes", results}}
                           .dump());
}

}  // namespace

void register_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "evaluate a checkpoint or artifact: flat, sliding, score-first / LoRA / phased TTT");
  static EvalArgs args;
  args.preset.add_to(cmd, false);
  cmd->add_option("--artifact", args.artifact, "artifact written by pgolf pack (dequantized as the references do)");
  cmd->add_option("--checkpoint", args.checkpoint, "safetensors checkpoint (needs --preset)");
  cmd->add_option("--val", args.val, "glob of validation shards (default: val_files)");
  cmd->add_option("--tokenizer", args.tokenizer, "SentencePiece model for the bpb byte tables (default: tokenizer_path)");
  cmd->add_option("--mode", args.modes, "flat|sliding|ttt-sgd|ttt-adamw|ttt-lora|ttt-phased; several run in order "
                                        "(comma-separated or repeated; default: eval_modes)")
      ->delimiter(',');
  cmd->add_option("--device", args.device, "auto (CUDA when a GPU is present), cpu or cuda")->capture_default_str();
  cmd->add_flag("--json", args.as_json, "print one JSON object");
  cmd->add_flag("--profile", args.profile,
                "CUDA: each mode's GPU kernel time and the kernels that take the most of it (CUPTI)");
  cmd->add_option("--top", args.top, "kernels listed by --profile (default 15)")->check(CLI::PositiveNumber);
  args.nproc.add_to(cmd);
  cmd->callback([] { run_eval(args); });
}

}  // namespace pgolf::cli
