// pgolf: one program for the whole Parameter Golf job (tokenize, train, pack, evaluate).
#include <fmt/core.h>

#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "cli/launch.h"
#include "core/error.h"

namespace pgolf::cli {

void PresetOptions::add_to(CLI::App* cmd, bool required) {
  auto* o = cmd->add_option("--preset", preset, "preset name (configs/NAME.toml) or path to a .toml file");
  if (required) o->required();
  cmd->add_flag("--one-gpu", one_gpu,
                "the one-GPU protocol: one GPU's share of the batch (train_batch_tokens / 8), no gradient accumulation");
  cmd->add_option("--set", sets, "override a configuration key: --set key=value (repeatable)")->take_all();
}

Config PresetOptions::resolve() const {
  Config c = Config::load(preset.empty() ? std::string("baseline") : preset);
  apply(c);
  return c;
}

void PresetOptions::apply(Config& c) const {
  if (one_gpu) apply_one_gpu_protocol(c);
  for (auto& s : sets) c.set_from_string(s);
}

void apply_one_gpu_protocol(Config& c) {
  const int64_t batch = c.get_int("train_batch_tokens");
  const int64_t seq = c.get_int("train_seq_len");
  PG_CHECK(batch % 8 == 0 && (batch / 8) % seq == 0,
           "--one-gpu: train_batch_tokens {} / 8 is not a whole number of train_seq_len {} sequences", batch, seq);
  c.set("train_batch_tokens", batch / 8);
  c.set("grad_accum_steps", int64_t{1});
}

}  // namespace pgolf::cli

int main(int argc, char** argv) {
  CLI::App app{"pgolf: train, pack and evaluate Parameter Golf language models (C++20/CUDA)"};
  app.require_subcommand(1);
  pgolf::cli::set_command_line(argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // log lines reach a pipe (a launcher, tee) as they are written
  app.set_version_flag("--version", std::string("pgolf ") + PGOLF_VERSION);
  pgolf::cli::register_inspect(app);
  pgolf::cli::register_prepare(app);
  pgolf::cli::register_tokenizer(app);
  pgolf::cli::register_pack(app);
  pgolf::cli::register_unpack(app);
  pgolf::cli::register_train(app);
  pgolf::cli::register_eval(app);
  pgolf::cli::register_run(app);
  pgolf::cli::register_bench(app);
  pgolf::cli::register_dist_selftest(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const pgolf::Error& e) {
    fmt::print(stderr, "pgolf: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "pgolf: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
