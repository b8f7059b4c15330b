// The pgolf subcommands. Each command file registers its CLI11 subcommand and its handler.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "core/config.h"

namespace pgolf::cli {

// Options shared by the commands that take a preset: --preset NAME|FILE.toml, --one-gpu and
// --set key=value...
struct PresetOptions {
  std::string preset;
  std::vector<std::string> sets;
  bool one_gpu = false;
  void add_to(CLI::App* cmd, bool required);
  Config resolve() const;           // loads the preset, then apply()
  void apply(Config& c) const;      // --one-gpu, then every --set in order
};

// The one-GPU comparison protocol: one GPU's share of the 8-GPU batch (train_batch_tokens / 8:
// 786,432 -> 98,304, 524,288 -> 65,536) and no gradient accumulation; everything else unchanged.
void apply_one_gpu_protocol(Config& c);

void register_inspect(CLI::App& app);
void register_prepare(CLI::App& app);
void register_tokenizer(CLI::App& app);
void register_pack(CLI::App& app);
void register_unpack(CLI::App& app);
void register_train(CLI::App& app);
void register_eval(CLI::App& app);
void register_run(CLI::App& app);
void register_bench(CLI::App& app);
void register_dist_selftest(CLI::App& app);

}  // namespace pgolf::cli
