// pgolf train: train a preset on token shards (src/train/trainer.h), with logs, metrics, checkpoints
// and resume.
#include <fmt/core.h>
#include <omp.h>
#include <unistd.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/launch.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "model/engine_factory.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace pgolf::cli {

namespace {

// Every configuration key with its default, wrapped for the help text.
std::string keys_footer() {
  std::string out = "Configuration keys (override any with --set key=value; defaults shown):\n ";
  size_t column = 1;
  const nlohmann::json defaults = Config::load("defaults").to_json();
  for (const auto& [key, value] : defaults.items()) {
    const std::string item = " " + key + "=" + value.dump();
    if (column + item.size() > 100) {
      out += "\n ";
      column = 1;
    }
    out += item;
    column += item.size();
  }
  return out + "\n";
}

// The run directory of a resumed run: --out, else the directory holding the checkpoint's checkpoints/ folder.
fs::path resumed_run_dir(const fs::path& checkpoint, const std::string& out) {
  if (!out.empty()) return out;
  const fs::path folder = checkpoint.parent_path();
  PG_CHECK(folder.filename() == "checkpoints",
           "--resume {}: the checkpoint is not in a run's checkpoints/ folder; give the run directory with --out",
           checkpoint.string());
  return folder.parent_path();
}

}  // namespace

void register_train(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "train a preset on token shards: logs, metrics, checkpoints, resume");
  static PresetOptions preset;
  static std::string data, val, tokenizer, out, resume, device = "auto";
  static int threads = 0;
  static NprocOption nproc;
  preset.add_to(cmd, false);
  cmd->add_option("--data", data, "glob of the training shards (sets train_files)");
  cmd->add_option("--val", val, "glob of the validation shards (sets val_files)");
  cmd->add_option("--tokenizer", tokenizer, "SentencePiece model for the bpb byte tables (sets tokenizer_path)");
  cmd->add_option("--out", out, "run directory (default: run_dir with {preset} replaced)");
  cmd->add_option("--resume", resume,
                  "continue from a checkpoint (its configuration is used unless --preset is given; "
                  "keys that shape training must match)");
  cmd->add_option("--threads", threads, "CPU threads (0 = OpenMP's default)");
  cmd->add_option("--device", device, "auto (CUDA when a GPU is present), cpu or cuda")->capture_default_str();
  nproc.add_to(cmd);
  cmd->footer(keys_footer);
  cmd->callback([] {
    const std::string backend = resolve_device(device);
    if (auto status = nproc.launch_ranks("pgolf train", backend)) return exit_command(*status);
    if (threads > 0) omp_set_num_threads(threads);
    std::unique_ptr<Checkpoint> checkpoint;
    Config config;
    fs::path run_dir;
    if (!resume.empty()) {
      checkpoint = std::make_unique<Checkpoint>(load_checkpoint(resume));
      config = preset.preset.empty() ? checkpoint->config : preset.resolve();
      if (preset.preset.empty()) {
        PG_CHECK(!preset.one_gpu, "pgolf train --resume {}: --one-gpu applies to a preset; the checkpoint's "
                 "configuration already holds its batch", resume);
        preset.apply(config);
      }
      run_dir = resumed_run_dir(resume, out);
    } else {
      PG_CHECK(!preset.preset.empty(), "pgolf train needs --preset NAME (or --resume CHECKPOINT)");
      config = preset.resolve();
    }
    if (!data.empty()) config.set("train_files", data);
    if (!val.empty()) config.set("val_files", val);
    if (!tokenizer.empty()) config.set("tokenizer_path", tokenizer);
    if (run_dir.empty()) run_dir = out.empty() ? resolve_run_dir(config) : fs::path(out);

    const ProcessGroup group = join_process_group("pgolf train", backend);
    const std::unique_ptr<Engine> engine = make_engine(config, *group.comm, backend);
    TrainOptions options;
    options.run_dir = run_dir;
    options.resume = checkpoint.get();
    options.echo = true;
    options.progress = ::isatty(STDERR_FILENO);
    if (!group.lead()) return (void)train(*engine, *group.comm, config, options);  // rank 0 reports
    fmt::print("pgolf train: preset {}, run directory {}, {} threads, {} engine, {} rank(s)\n", config.preset_name(),
               run_dir.string(), omp_get_max_threads(), engine->backend_name(), group.comm->world_size());
    const TrainResult r = train(*engine, *group.comm, config, options);
    const ValRecord& last = r.validations.back();
    fmt::print("\nsteps {} | train_time {:.1f} s | val_bpb {:.4f}", r.final_state.step, r.final_state.train_ms / 1000.0,
               last.val.val_bpb);
    if (last.heldout) fmt::print(" | heldout_bpb {:.4f}", last.heldout->val_bpb);
    if (r.averaged) fmt::print(" | post_{} val_bpb {:.4f}", r.averaging, r.averaged->val.val_bpb);
    fmt::print("\nwrote {}\n", (run_dir / "final_model.safetensors").string());
  });
}

}  // namespace pgolf::cli
