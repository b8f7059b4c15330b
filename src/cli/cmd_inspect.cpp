// pgolf inspect: describe a preset's model (parameter counts per group), or a file.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <map>

#include "cli/commands.h"
#include "model/config.h"

namespace pgolf::cli {

namespace {

void inspect_preset(const Config& cfg, bool as_json) {
  ModelConfig m = ModelConfig::from_config(cfg);
  auto specs = param_specs(m);
  std::map<std::string, int64_t> per_group;
  int64_t total = 0;
  for (auto& p : specs) {
    per_group[param_group_name(p.group)] += p.numel();
    total += p.numel();
  }
  if (as_json) {
    nlohmann::json j;
    j["preset"] = cfg.preset_name();
    j["params"] = total;
    j["params_per_group"] = per_group;
    j["tensors"] = specs.size();
    j["layers"] = m.num_layers;
    j["model_dim"] = m.model_dim;
    j["vocab_size"] = m.vocab_size;
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("preset {}: {} parameters in {} tensors\n", cfg.preset_name(), total, specs.size());
  for (auto& [g, n] : per_group) fmt::print("  {:<7} {:>12}\n", g, n);
  for (auto& p : specs)
    fmt::print("  {:<34} {:<16} {:<6} {:>10}\n", p.name, shape_str(p.shape), param_group_name(p.group), p.numel());
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "describe a preset's model (--preset) or a file");
  static PresetOptions preset;
  static bool as_json = false;
  preset.add_to(cmd, false);
  cmd->add_flag("--json", as_json, "print one JSON object");
  cmd->callback([&] {
    PG_CHECK(!preset.preset.empty(), "inspect needs --preset NAME (or a file to describe)");
    inspect_preset(preset.resolve(), as_json);
  });
}

}  // namespace pgolf::cli
