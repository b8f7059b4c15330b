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

}  // namespace

void register_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "describe a preset's model (--preset) or token shards (SHARD...)");
  static PresetOptions preset;
  static bool as_json = false;
  static std::vector<std::string> files;
  static std::string tokenizer_path;
  static int64_t seq_len = 0;
  preset.add_to(cmd, false);
  cmd->add_flag("--json", as_json, "print one JSON object");
  cmd->add_option("files", files, "shards to describe as one stream (tokens, documents, bpb targets and bytes)");
  cmd->add_option("--tokenizer", tokenizer_path, "SentencePiece model for shards: documents, bytes, id check");
  cmd->add_option("--seq-len", seq_len, "for shards: count targets truncated to a multiple of this (SPEC 2.5)");
  cmd->callback([&] {
    if (!files.empty()) {
      inspect_shards({files.begin(), files.end()}, tokenizer_path, seq_len, as_json);
      return;
    }
    PG_CHECK(!preset.preset.empty(), "inspect needs --preset NAME or shard files to describe");
    inspect_preset(preset.resolve(), as_json);
  });
}

}  // namespace pgolf::cli
