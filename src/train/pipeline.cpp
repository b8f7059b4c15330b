#include "train/pipeline.h"

#include <fmt/core.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "data/loaders.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "dist/communicator.h"
#include "eval/flat.h"
#include "eval/modes.h"
#include "quant/artifact.h"
#include "quant/fit.h"
#include "quant/pack.h"
#include "train/trainer.h"

namespace pgolf {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

nlohmann::ordered_json flat_json(const FlatEvalResult& r) {
  return {{"val_loss", r.val_loss}, {"val_bpb", r.val_bpb}, {"tokens", r.tokens}, {"bytes", r.bytes},
          {"seconds", r.seconds}};
}

// GPTQ calibration (SPEC §5.7): `gptq_calibration_batches` batches of the shuffled-sequence loader over
// the training shards, each this rank's share of a training batch, through the finished (averaged)
// model in eval mode with its final layer plan; H = Σ XᵀX / batches, as `pack --hessians` reads them.
TensorMap calibrate_hessians(Engine& engine, Communicator& comm, const Config& cfg) {
  const auto files = find_shards(cfg.get_string("train_files"));
  const int64_t T = cfg.get_int("train_seq_len");
  const int accum = resolve_grad_accum(cfg, comm.world_size());
  ShuffledSequenceLoader loader(files, comm.rank(), comm.world_size(), T, static_cast<uint64_t>(cfg.get_int("seed")),
                                cfg.get_int("vocab_size"));
  const int64_t batches = cfg.get_int("gptq_calibration_batches");
  PG_CHECK(batches > 0, "gptq_calibration_batches must be positive for quant_scheme = gptq_full, got {}", batches);
  TensorMap sums;
  for (int64_t i = 0; i < batches; ++i) {
    const Batch b = loader.next(cfg.get_int("train_batch_tokens"), accum);
    engine.accumulate_hessians(b, sums);
  }
  TensorMap out;
  const float inv = 1.0f / static_cast<float>(batches);
  for (const auto& name : sums.names()) {
    HostTensor h = sums.get(name);
    for (float& x : h.as<float>()) x *= inv;
    out.set("hessian/" + name, std::move(h));
  }
  return out;
}

std::string fmt_bpb(const nlohmann::ordered_json& j) {
  return j.is_number() ? fmt::format("{:.5f}", j.get<double>()) : std::string("-");
}

}  // namespace

nlohmann::ordered_json run_pipeline(const Config& cfg, Communicator& comm, const EngineMaker& make_engine,
                            const PipelineOptions& options) {
  const bool root = comm.rank() == 0;
  const fs::path& dir = options.run_dir;
  nlohmann::ordered_json results = {{"preset", cfg.preset_name()}, {"world_size", comm.world_size()}};
  nlohmann::ordered_json phases = nlohmann::ordered_json::object();
  auto t_all = Clock::now();

  // ---- 1. train (averaging and the post-average diagnostic inside) -------------------------------
  std::unique_ptr<Engine> engine = make_engine(cfg, comm);
  results["backend"] = engine->backend_name();
  auto t0 = Clock::now();
  TrainOptions to;
  to.run_dir = dir;
  to.echo = options.echo && root;
  to.progress = options.progress && root;
  const TrainResult tr = train(*engine, comm, cfg, to);
  phases["train"] = since(t0);
  const double train_ms = tr.final_state.train_ms;
  const int64_t steps = tr.final_state.step;
  const int64_t tokens_per_step = cfg.get_int("train_batch_tokens");
  results["steps"] = steps;
  results["train_time_ms"] = train_ms;
  results["ms_per_step"] = steps > 0 ? train_ms / static_cast<double>(steps) : 0.0;
  results["tokens_per_s"] = train_ms > 0 ? static_cast<double>(steps * tokens_per_step) / (train_ms / 1000.0) : 0.0;
  results["params"] = engine->layout().count();
  PG_CHECK(!tr.validations.empty(), "the training run ended without a validation");
  results["val_live"] = flat_json(tr.validations.back().val);
  const FlatEvalResult& pre = tr.averaged ? tr.averaged->val : tr.validations.back().val;
  results["averaging"] = tr.averaging.empty() ? "none" : tr.averaging;
  results["val_pre_quant"] = flat_json(pre);
  if (tr.validations.back().heldout)
    results["heldout_pre_quant"] = flat_json(tr.averaged && tr.averaged->heldout ? *tr.averaged->heldout
                                                                                : *tr.validations.back().heldout);

  // ---- 2. GPTQ calibration on training data (s1560) ----------------------------------------------
  engine->load_params(tr.final_params);
  TensorMap hessians;
  const bool full_gptq = cfg.get_string("quant_scheme") == "gptq_full";
  if (full_gptq) {
    t0 = Clock::now();
    hessians = calibrate_hessians(*engine, comm, cfg);
    phases["gptq_calibration"] = since(t0);
  }

  // ---- 3. quantize + compress → artifact (rank 0), read back by every rank ----------------------
  const fs::path artifact_path = dir / "final_model.pgolf";
  if (root) {
    t0 = Clock::now();
    Artifact art = build_artifact(cfg, tr.final_params.to_tensors(), full_gptq ? &hessians : nullptr);
    phases["quantize"] = since(t0);
    t0 = Clock::now();
    const int64_t code_bytes = code_archive_bytes(default_code_archive());
    const FittedArtifact fitted = fit_artifact(art, FitOptions::from_config(cfg, code_bytes));
    write_file_atomic(artifact_path, fitted.file);
    phases["compress"] = since(t0);
    const FitReport& fit = fitted.report;
    results["artifact"] = {{"path", artifact_path.string()},
                           {"scheme", art.scheme},
                           {"compressor", art.compression.name()},
                           {"model_bytes", fit.model_bytes},
                           {"code_bytes", code_bytes},
                           {"total_bytes", fit.model_bytes + code_bytes},
                           {"cap_bytes", fit.cap_bytes},
                           {"under_cap", fit.under_cap()},
                           {"fit", fit.to_json()}};
  }
  comm.barrier();

  // ---- 4. round trip: dequantize into a fresh copy of the weights, flat evaluation --------------
  t0 = Clock::now();
  const Artifact read_back = read_artifact(artifact_path);
  ParamSet<float> dequantized(engine->layout());
  dequantized.load_tensors(artifact_weights(read_back), artifact_path.string());
  phases["dequantize"] = since(t0);

  const Tokenizer tokenizer(cfg.get_string("tokenizer_path"));
  const ModelConfig model = ModelConfig::from_config(cfg);
  const ByteTables tables = tokenizer.byte_tables(model.vocab_size);
  const std::vector<uint16_t> val = load_eval_tokens(cfg.get_string("val_files"), cfg);
  engine->load_params(dequantized);
  t0 = Clock::now();
  FlatEvalOptions fo = FlatEvalOptions::from_config(cfg, resolve_grad_accum(cfg, comm.world_size()), tokenizer.bos_id());
  const FlatEvalResult post = evaluate_flat(*engine, comm, val, tables, fo);
  phases["roundtrip_eval"] = since(t0);
  results["val_post_quant"] = flat_json(post);
  if (options.echo && root)
    fmt::print("final_roundtrip val_loss:{:.8f} val_bpb:{:.8f} eval_time:{:.0f}ms\n", post.val_loss, post.val_bpb,
               1000.0 * post.seconds);

  // ---- 5. the preset's scoring evaluations, each from the dequantized weights -------------------
  const EvalInputs inputs{val, &tables, tokenizer.bos_id(), resolve_eval_seq_len(cfg)};
  nlohmann::ordered_json evals = nlohmann::ordered_json::array();
  nlohmann::ordered_json final_score = results["val_post_quant"]["val_bpb"];
  std::string final_mode = "roundtrip";
  for (const auto& mode : cfg.get_string_list("eval_modes")) {
    check_eval_mode(mode);
    if (mode == "flat") continue;  // the round-trip evaluation above is the flat score
    engine->load_params(dequantized);
    t0 = Clock::now();
    const EvalOutcome o = run_eval_mode(mode, *engine, comm, cfg, inputs);
    phases["eval_" + mode] = since(t0);
    nlohmann::ordered_json e = {{"mode", o.mode},       {"val_loss", o.val_loss()}, {"val_bpb", o.val_bpb()},
                        {"tokens", o.tokens()}, {"bytes", o.bytes()},       {"score_seconds", o.score_seconds},
                        {"train_seconds", o.train_seconds}, {"legal", o.legal}, {"complete", o.complete},
                        {"note", o.note}};
    if (!o.legal) e["label"] = kNotLegalLabel;
    if (options.echo && root)
      fmt::print("{}final_{} val_loss:{:.8f} val_bpb:{:.8f} eval_time:{:.0f}ms\n", o.legal ? "" : std::string(kNotLegalLabel) + " ",
                 o.mode, o.val_loss(), o.val_bpb(), 1000.0 * (o.score_seconds + o.train_seconds));
    evals.push_back(e);
    if (o.legal && o.complete) {
      final_score = o.val_bpb();
      final_mode = o.mode;
    }
  }
  results["evals"] = evals;
  results["val_final"] = {{"mode", final_mode}, {"val_bpb", final_score}};
  phases["total"] = since(t_all);
  results["phase_seconds"] = phases;

  if (root) {
    write_text_file_atomic(dir / "results.json", results.dump(2) + "\n");
    if (options.plots) plot_curves(dir);
    if (options.echo) fmt::print("\n{}", results_table(results));
  }
  return results;
}

std::string results_table(const nlohmann::ordered_json& r) {
  std::ostringstream os;
  auto row = [&](const std::string& k, const std::string& v) { os << fmt::format("| {:<34} | {:>24} |\n", k, v); };
  os << fmt::format("| {:<34} | {:>24} |\n|{:-<36}|{:->26}|\n", "pgolf run: " + r.value("preset", std::string()),
                    r.value("backend", std::string()) + " engine", "", "");
  row("steps", std::to_string(r.value("steps", 0)));
  row("ms / step", fmt::format("{:.1f}", r.value("ms_per_step", 0.0)));
  row("tokens / s", fmt::format("{:.0f}", r.value("tokens_per_s", 0.0)));
  row("parameters", std::to_string(r.value("params", 0)));
  row("val_bpb after training (" + r.value("averaging", std::string("none")) + ")", fmt_bpb(r["val_pre_quant"]["val_bpb"]));
  if (r.contains("heldout_pre_quant")) row("held-out bpb after training", fmt_bpb(r["heldout_pre_quant"]["val_bpb"]));
  row("val_bpb after quantization", fmt_bpb(r["val_post_quant"]["val_bpb"]));
  for (const auto& e : r["evals"]) {
    std::string label = "val_bpb " + e["mode"].get<std::string>();
    if (!e["legal"].get<bool>()) label += " (NOT LEGAL)";
    if (!e["complete"].get<bool>()) label += " (incomplete)";
    row(label, fmt_bpb(e["val_bpb"]));
  }
  row("final val_bpb (" + r["val_final"]["mode"].get<std::string>() + ")", fmt_bpb(r["val_final"]["val_bpb"]));
  if (r.contains("artifact")) {
    const auto& a = r["artifact"];
    row("artifact " + a["scheme"].get<std::string>() + " + " + a["compressor"].get<std::string>(),
        fmt::format("{} B", a["model_bytes"].get<int64_t>()));
    row("code bytes", fmt::format("{} B", a["code_bytes"].get<int64_t>()));
    if (a.contains("fit") && a["fit"]["pruned"].get<int64_t>() > 0)
      row("fit: +-1 codes zeroed", fmt::format("{} of {}", a["fit"]["pruned"].get<int64_t>(),
                                              a["fit"]["candidates"].get<int64_t>()));
    row(fmt::format("total bytes (cap {})", a["cap_bytes"].get<int64_t>()),
        fmt::format("{} B {}", a["total_bytes"].get<int64_t>(), a["under_cap"].get<bool>() ? "ok" : "OVER"));
  }
  for (const auto& [phase, s] : r["phase_seconds"].items()) row("time: " + phase, fmt::format("{:.1f} s", s.get<double>()));
  return os.str();
}

namespace {

// A gnuplot y range ("lo:hi") spanning the values of `series` ("step value" rows) after the first 5 %
// of the steps, with a 5 % margin: the first values (the loss at initialization is several times the
// final one) would flatten the rest of a curve, so they leave the plot at its top.
std::string y_range_after_start(std::initializer_list<const std::string*> series) {
  std::vector<std::pair<int64_t, double>> points;
  for (const std::string* rows_text : series) {
    std::istringstream rows(*rows_text);
    int64_t step;
    double value;
    while (rows >> step >> value) points.emplace_back(step, value);
  }
  int64_t last = 0;
  for (const auto& p : points) last = std::max(last, p.first);
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& [step, value] : points) {
    if (step < last / 20) continue;
    lo = std::min(lo, value);
    hi = std::max(hi, value);
  }
  if (!(lo <= hi)) return "*:*";  // nothing after the start: gnuplot's own range
  const double margin = 0.05 * std::max(hi - lo, 1e-3);
  return fmt::format("{:.4g}:{:.4g}", lo - margin, hi + margin);
}

}  // namespace

void plot_curves(const fs::path& run_dir) {
  const fs::path metrics = run_dir / "metrics.jsonl";
  std::ifstream in(metrics);
  PG_CHECK(in.good(), "plot: cannot read {}", metrics.string());
  std::string train_rows, val_rows, heldout_rows, line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    const std::string ev = j.value("event", std::string());
    if (ev == "train") train_rows += fmt::format("{} {}\n", j["step"].get<int64_t>(), j["train_loss"].get<double>());
    if (ev == "val") {
      val_rows += fmt::format("{} {}\n", j["step"].get<int64_t>(), j["val_bpb"].get<double>());
      if (j.contains("heldout_bpb"))
        heldout_rows += fmt::format("{} {}\n", j["step"].get<int64_t>(), j["heldout_bpb"].get<double>());
    }
  }
  PG_CHECK(!train_rows.empty() && !val_rows.empty(), "plot: {} holds no training or validation records",
           metrics.string());
  const std::string loss_range = y_range_after_start({&train_rows});
  const std::string bpb_range = y_range_after_start({&val_rows, &heldout_rows});
  const fs::path plot_dir = run_dir / "plot";
  fs::create_directories(plot_dir);
  write_text_file_atomic(plot_dir / "train.dat", train_rows);
  write_text_file_atomic(plot_dir / "val.dat", val_rows);
  if (!heldout_rows.empty()) write_text_file_atomic(plot_dir / "heldout.dat", heldout_rows);
  const std::string script = fmt::format(
      "set terminal pngcairo size 1200,500 noenhanced\n"
      "set output '{0}'\n"
      "set multiplot layout 1,2\n"
      "set grid\nset xlabel 'step'\n"
      "set title 'training loss'\nset yrange [{3}]\nplot '{1}/train.dat' using 1:2 with lines title 'train loss'\n"
      "set title 'validation bits per byte'\nset yrange [{4}]\nplot '{1}/val.dat' using 1:2 with linespoints title 'val bpb'{2}\n"
      "unset multiplot\n",
      (run_dir / "curves.png").string(), plot_dir.string(),
      heldout_rows.empty() ? std::string()
                           : fmt::format(", '{}/heldout.dat' using 1:2 with linespoints title 'held-out bpb'",
                                         plot_dir.string()),
      loss_range, bpb_range);
  write_text_file_atomic(plot_dir / "curves.gp", script);
  const std::string cmd = "gnuplot '" + (plot_dir / "curves.gp").string() + "' 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  PG_CHECK(p != nullptr, "plot: cannot start gnuplot");
  std::string out;
  char buf[512];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int st = ::pclose(p);
  PG_CHECK(st == 0 && fs::exists(run_dir / "curves.png"),
           "plot: gnuplot failed (is gnuplot installed? scripts/setup.sh installs gnuplot-nox): {}", out);
}

}  // namespace pgolf
