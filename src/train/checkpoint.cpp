#include "train/checkpoint.h"

#include <string_view>

#include "core/error.h"
#include "core/safetensors.h"

namespace pgolf {

namespace {

constexpr const char* kFormat = "pgolf-train-checkpoint";
constexpr const char* kVersion = "1";

}  // namespace

void to_json(nlohmann::json& j, const TrainerState& s) {
  j = {{"step", s.step},      {"train_ms", s.train_ms},
       {"qat", s.qat},        {"looping", s.looping},
       {"stop_after_step", s.stop_after_step}, {"loader", s.loader}};
}

void from_json(const nlohmann::json& j, TrainerState& s) {
  j.at("step").get_to(s.step);
  j.at("train_ms").get_to(s.train_ms);
  j.at("qat").get_to(s.qat);
  j.at("looping").get_to(s.looping);
  j.at("stop_after_step").get_to(s.stop_after_step);
  s.loader = j.at("loader");
}

void save_checkpoint(const fs::path& path, const Config& config, const TrainerState& state, const TensorMap& tensors) {
  Metadata meta{{"format", kFormat},
                {"version", kVersion},
                {"config", config.to_toml()},
                {"trainer", nlohmann::json(state).dump()}};
  fs::create_directories(path.parent_path());
  save_safetensors(path, tensors, meta);
}

Checkpoint load_checkpoint(const fs::path& path) {
  Metadata meta;
  Checkpoint c;
  c.tensors = load_safetensors(path, &meta);
  auto field = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    PG_CHECK(it != meta.end(), "{}: not a pgolf training checkpoint (no '{}' in its metadata)", path.string(), key);
    return it->second;
  };
  PG_CHECK(field("format") == kFormat, "{}: metadata format '{}', expected '{}'", path.string(), field("format"),
           kFormat);
  PG_CHECK(field("version") == kVersion, "{}: checkpoint version '{}', this program reads version {}", path.string(),
           field("version"), kVersion);
  c.config = Config::from_toml(field("config"), path.string() + " (config)");
  try {
    c.state = nlohmann::json::parse(field("trainer")).get<TrainerState>();
  } catch (const nlohmann::json::exception& e) {
    fail("{}: bad trainer state in the metadata: {}", path.string(), e.what());
  }
  PG_CHECK(c.state.step >= 0 && c.state.train_ms >= 0.0, "{}: trainer state has step {} and train_ms {}",
           path.string(), c.state.step, c.state.train_ms);
  return c;
}

bool resume_may_change(const std::string& key) {
  static constexpr std::string_view kExact[] = {
      "train_files",      "val_files",        "heldout_files",   "tokenizer_path",   "run_dir",
      "val_loss_every",   "train_log_every",  "val_batch_tokens", "val_max_tokens",  "val_doc_isolated",
      "val_rank_seq_multiple", "checkpoint_every", "sliding_rule", "fp16_keep"};
  // Post-training work: quantization, artifact and evaluation settings.
  static constexpr std::string_view kPrefixes[] = {
      "quant_",  "passthrough_", "prune_",    "int6_",  "gptq_calibration", "gptq_block", "gptq_damp", "matrix_bits",
      "embed_bits", "matrix_clip", "embed_clip", "compressor", "byte_shuffle", "eval_", "ttt_"};
  for (auto k : kExact)
    if (key == k) return true;
  for (auto p : kPrefixes)
    if (key.rfind(p, 0) == 0) return true;
  return key.rfind("phased_ttt_", 0) == 0;
}

void check_resume_config(const Config& saved, const Config& now, const std::string& what) {
  const nlohmann::json saved_json = saved.to_json(), now_json = now.to_json();
  std::string differences;
  for (const auto& [key, value] : now.values()) {
    if (resume_may_change(key)) continue;
    auto it = saved.values().find(key);
    if (it == saved.values().end() || !(it->second == value))
      differences += fmt::format("\n  {}: checkpoint {}, now {}", key,
                                 saved_json.contains(key) ? saved_json[key].dump() : "(absent)", now_json[key].dump());
  }
  PG_CHECK(differences.empty(), "{}: the configuration differs from the checkpoint's in keys that shape training "
           "(resume with the same values, or start a new run):{}", what, differences);
}

}  // namespace pgolf
