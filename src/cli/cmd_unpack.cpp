// pgolf unpack: dequantize an artifact into a safetensors checkpoint (the weights evaluation loads).
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/safetensors.h"
#include "quant/artifact.h"

namespace pgolf::cli {

void register_unpack(CLI::App& app) {
  auto* cmd = app.add_subcommand("unpack", "dequantize an artifact into a safetensors checkpoint");
  static std::string artifact_path, out;
  static bool as_json = false;
  cmd->add_option("--artifact", artifact_path, "artifact written by pgolf pack")->required();
  cmd->add_option("--out", out, "safetensors checkpoint to write")->required();
  cmd->add_flag("--json", as_json, "print one JSON object");
  cmd->callback([] {
    const Artifact a = read_artifact(artifact_path);
    const TensorMap weights = artifact_weights(a);
    save_safetensors(out, weights, {{"format", "pt"}, {"pgolf_preset", a.preset}, {"pgolf_source", "artifact"}});
    int64_t values = 0;
    for (const auto& n : weights.names()) values += weights.get(n).numel();
    if (as_json) {
      fmt::print("{}\n", nlohmann::json{{"checkpoint", out}, {"preset", a.preset}, {"scheme", a.scheme},
                                        {"tensors", weights.size()}, {"values", values}}
                             .dump());
      return;
    }
    fmt::print("unpack {} ({}, {}): {} tensors, {} values\nwrote {}\n", artifact_path, a.preset, a.scheme,
               weights.size(), values, out);
  });
}

}  // namespace pgolf::cli
