// pgolf run: the whole job of a reference script for a preset (train → average → calibrate → pack →
// round trip → score), ending with one results table (src/train/pipeline.h). With no preset it runs
// the `default` preset on the default corpus (src/train/default_corpus.h), which it prepares first.
#include <fmt/core.h>
#include <unistd.h>

#include "cli/commands.h"
#include "cli/launch.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "model/engine_factory.h"
#include "train/default_corpus.h"
#include "train/pipeline.h"
#include "train/trainer.h"

namespace pgolf::cli {

void register_run(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "run", "the whole pipeline of a preset: train, average, pack, read back, evaluate; one results table "
             "(no preset: a few-minute CPU demo on English text from Debian's fortunes packages)");
  static PresetOptions preset;
  static std::string data, val, tokenizer, out, default_dir = "data/default",
                                                 fortune_dir = "/usr/share/games/fortunes";
  static std::string device = "auto";
  static bool no_plots = false;
  static std::string plot_only;
  static NprocOption nproc;
  preset.add_to(cmd, false);
  cmd->add_option("--data", data, "glob of the training shards (sets train_files)");
  cmd->add_option("--val", val, "glob of the validation shards (sets val_files)");
  cmd->add_option("--tokenizer", tokenizer, "SentencePiece model (sets tokenizer_path)");
  cmd->add_option("--out", out, "run directory (default: run_dir with {preset} replaced)");
  cmd->add_option("--default-data", default_dir, "where the default corpus is prepared (no --preset)")->capture_default_str();
  cmd->add_option("--fortunes", fortune_dir, "the fortune texts of the default corpus")->capture_default_str();
  cmd->add_option("--device", device, "auto (CUDA when a GPU is present), cpu or cuda")->capture_default_str();
  cmd->add_flag("--no-plots", no_plots, "do not draw curves.png (gnuplot)");
  cmd->add_option("--plot-only", plot_only,
                  "draw curves.png of the run directory given (from its metrics.jsonl), e.g. of a run made with "
                  "--no-plots on a machine without gnuplot, and do nothing else");
  nproc.add_to(cmd);
  cmd->callback([] {
    if (!plot_only.empty()) {
      plot_curves(plot_only);
      fmt::print("{}\n", (fs::path(plot_only) / "curves.png").string());
      return;
    }
    const std::string backend = resolve_device(device);
    if (auto status = nproc.launch_ranks("pgolf run", backend)) return exit_command(*status);
    const ProcessGroup group = join_process_group("pgolf run", backend);
    Config cfg = Config::load(preset.preset.empty() ? std::string("default") : preset.preset);
    if (preset.preset.empty() && data.empty()) {
      // Rank 0 prepares the default corpus; the others find it ready.
      if (!group.lead()) group.comm->barrier();
      const DefaultData d = ensure_default_data(default_dir, fortune_dir, group.lead());
      if (group.lead()) group.comm->barrier();
      cfg.set("train_files", d.train_glob);
      cfg.set("val_files", d.val_glob);
      cfg.set("tokenizer_path", d.tokenizer);
    }
    preset.apply(cfg);
    if (!data.empty()) cfg.set("train_files", data);
    if (!val.empty()) cfg.set("val_files", val);
    if (!tokenizer.empty()) cfg.set("tokenizer_path", tokenizer);
    PipelineOptions po;
    po.run_dir = out.empty() ? resolve_run_dir(cfg) : fs::path(out);
    po.echo = group.lead();
    po.progress = group.lead() && ::isatty(2) != 0;
    po.plots = !no_plots;
    const EngineMaker make = [backend](const Config& c, Communicator& cm) { return make_engine(c, cm, backend); };
    run_pipeline(cfg, *group.comm, make, po);
  });
}

}  // namespace pgolf::cli
