// pgolf inspect: describe a preset's model (parameter counts per group), or token shards.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <optional>

#include "cli/commands.h"
#include "data/bpb.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "core/safetensors.h"
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

// Shards are read as one validation stream (SPEC 2.5: in name order, concatenated). With a tokenizer:
// documents (BOS count) and the bpb targets and bytes (SPEC 2.6), over every target and truncated to
// a multiple of seq_len.
void inspect_shards(std::vector<fs::path> files, const std::string& tokenizer_path, int64_t seq_len, bool as_json) {
  std::sort(files.begin(), files.end());
  std::optional<Tokenizer> tok;
  if (!tokenizer_path.empty()) tok.emplace(tokenizer_path);
  std::vector<uint16_t> tokens = load_validation_tokens(files, 0, tok ? tok->vocab_size() : 0);
  nlohmann::json j;
  j["files"] = nlohmann::json::array();
  for (auto& f : files) j["files"].push_back(f.string());
  j["tokens"] = tokens.size();
  j["max_id"] = max_token_id(tokens);
  if (tok) {
    const ByteTables tables = tok->byte_tables();
    const std::span<const uint16_t> all(tokens);
    const TargetBytes every = count_stream_bytes(tables, all);
    const TargetBytes kept =
        seq_len > 0 ? count_stream_bytes(tables, all.first(usable_targets(all.size(), seq_len) + 1)) : every;
    j["tokenizer"] = tok->path().string();
    j["vocab_size"] = tok->vocab_size();
    j["docs"] = std::count(tokens.begin(), tokens.end(), static_cast<uint16_t>(tok->bos_id()));
    j["seq_len"] = seq_len;
    j["targets"] = kept.targets;
    j["bytes"] = kept.bytes;
    j["targets_all"] = every.targets;
    j["bytes_all"] = every.bytes;
    j["tokens_per_byte"] = kept.bytes ? double(kept.targets) / double(kept.bytes) : 0.0;
  }
  if (as_json) {
    fmt::print("{}\n", j.dump());
    return;
  }
  for (auto& [key, value] : j.items()) fmt::print("{:<16} {}\n", key, value.dump());
}

// A checkpoint: its tensors (parameters and training state), grouped by prefix.
void inspect_checkpoint(const std::string& path, bool as_json) {
  Metadata meta;
  const TensorMap t = load_safetensors(path, &meta);
  std::map<std::string, int64_t> per_prefix;
  nlohmann::json tensors = nlohmann::json::array();
  for (auto& name : t.names()) {
    const HostTensor& h = t.get(name);
    const auto slash = name.find('/');
    per_prefix[slash == std::string::npos ? "params" : name.substr(0, slash)] += h.numel();
    tensors.push_back({{"name", name}, {"dtype", dtype_name(h.dtype)}, {"shape", h.shape}});
  }
  if (as_json) {
    nlohmann::json j = {{"checkpoint", path}, {"tensors", tensors}, {"numel_per_prefix", per_prefix},
                        {"metadata", meta}};
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("checkpoint {}: {} tensors\n", path, t.size());
  for (auto& [k, v] : meta) fmt::print("  {} = {}\n", k, v.size() > 80 ? v.substr(0, 77) + "..." : v);
  for (auto& [p, n] : per_prefix) fmt::print("  {:<8} {:>12} values\n", p, n);
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
  auto* cmd = app.add_subcommand("inspect", "describe a preset's model (--preset), token shards, a checkpoint or an artifact");
  static PresetOptions preset;
  static bool as_json = false;
  static std::vector<std::string> files;
  static std::string tokenizer_path;
  static int64_t seq_len = 0;
  preset.add_to(cmd, false);
  cmd->add_flag("--json", as_json, "print one JSON object");
  cmd->add_option("files", files,
                  "files to describe: token shards (as one stream: tokens, documents, bpb targets and bytes), "
                  "a checkpoint (.safetensors) or an artifact");
  cmd->add_option("--tokenizer", tokenizer_path, "SentencePiece model for shards: documents, bytes, id check");
  cmd->add_option("--seq-len", seq_len, "for shards: count targets truncated to a multiple of this (SPEC 2.5)");
  cmd->callback([&] {
    if (!files.empty()) {
      if (files.size() == 1 && is_artifact_file(files[0])) return inspect_artifact(files[0], as_json);
      if (files.size() == 1 && fs::path(files[0]).extension() == ".safetensors")
        return inspect_checkpoint(files[0], as_json);
      inspect_shards({files.begin(), files.end()}, tokenizer_path, seq_len, as_json);
      return;
    }
    PG_CHECK(!preset.preset.empty(), "inspect needs --preset NAME or a file to describe (shards, a checkpoint, an artifact)");
    inspect_preset(preset.resolve(), as_json);
  });
}

}  // namespace pgolf::cli
