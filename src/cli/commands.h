// The pgolf subcommands. Each command file registers its CLI11 subcommand and its handler.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "core/config.h"

namespace pgolf::cli {

// Options shared by the commands that take a preset: --preset NAME|FILE.toml and --set key=value...
struct PresetOptions {
  std::string preset;
  std::vector<std::string> sets;
  void add_to(CLI::App* cmd, bool required);
  Config resolve() const;  // loads the preset and applies every --set in order
};

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
