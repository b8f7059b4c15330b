// pgolf inspect: describe a preset's model (parameter counts per group), or a file.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <map>

#include "cli/commands.h"
#include "model/config.h"
#include "quant/artifact.h"
#include "quant/int6_pack.h"

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

// An artifact: its header (preset, scheme, compressor, sizes) and every tensor's routing and bytes.
void inspect_artifact(const std::string& path, bool as_json) {
  ArtifactSizes sizes;
  const Artifact a = read_artifact(path, &sizes);
  auto stored_bytes = [](const QuantizedTensor& t) -> size_t {
    if (t.plan.method == QuantMethod::Passthrough) return t.passthrough.bytes.size();
    return (t.plan.packed ? packed_int6_bytes(t.codes.size()) : t.codes.size()) + t.scale.bytes.size();
  };
  if (as_json) {
    nlohmann::json tensors = nlohmann::json::array();
    for (const auto& t : a.model.tensors)
      tensors.push_back({{"name", t.plan.name}, {"category", t.plan.category}, {"method", quant_method_name(t.plan.method)},
                         {"label", t.plan.label}, {"bits", t.plan.bits}, {"shape", t.plan.shape},
                         {"dtype", dtype_name(t.plan.dtype)}, {"bytes", stored_bytes(t)}});
    nlohmann::json pruned = nlohmann::json::array();
    for (const auto& r : a.model.pruned)
      pruned.push_back({{"name", r.name}, {"threshold", r.threshold}, {"zeroed", r.zeroed}, {"numel", r.numel}});
    nlohmann::json j = {{"artifact", path},           {"format_version", kArtifactVersion},
                        {"preset", a.preset},         {"scheme", a.scheme},
                        {"compressor", a.compression.name()},
                        {"file_bytes", sizes.file_bytes},   {"payload_bytes", sizes.payload_bytes},
                        {"header_bytes", sizes.header_bytes}, {"codes_bytes", sizes.codes_bytes},
                        {"scales_bytes", sizes.scales_bytes}, {"passthrough_bytes", sizes.passthrough_bytes},
                        {"bank_layers", a.bank_layers}, {"pruned", pruned}, {"tensors", tensors},
                        {"config", a.config_toml}};
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("artifact {} (format version {}): preset {}, scheme {}, compressor {}\n", path, kArtifactVersion,
             a.preset, a.scheme, a.compression.name());
  fmt::print("  file {} bytes; payload {} bytes = header {} + codes {} + scales {} + passthrough {}\n",
             sizes.file_bytes, sizes.payload_bytes, 4 + sizes.header_bytes, sizes.codes_bytes, sizes.scales_bytes,
             sizes.passthrough_bytes);
  if (a.bank_layers > 0) fmt::print("  parameter banks of {} layers (stored unbanked)\n", a.bank_layers);
  if (!a.model.pruned.empty()) fmt::print("  {} tensors magnitude-pruned before quantization\n", a.model.pruned.size());
  for (const auto& t : a.model.tensors)
    fmt::print("  {:<34} {:<7} {:<22} {:<14} {:>10}\n", t.plan.name, t.plan.category, t.plan.label,
               shape_str(t.plan.shape), stored_bytes(t));
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "describe a preset's model (--preset) or a file");
  static PresetOptions preset;
  static bool as_json = false;
  static std::string file;
  preset.add_to(cmd, false);
  cmd->add_option("file", file, "a file to describe (a pgolf artifact)");
  cmd->add_flag("--json", as_json, "print one JSON object");
  cmd->callback([&] {
    if (!file.empty()) {
      PG_CHECK(is_artifact_file(file), "inspect: {} is not a pgolf artifact (inspect describes presets and artifacts)",
               file);
      return inspect_artifact(file, as_json);
    }
    PG_CHECK(!preset.preset.empty(), "inspect needs --preset NAME (or a file to describe)");
    inspect_preset(preset.resolve(), as_json);
  });
}

}  // namespace pgolf::cli
