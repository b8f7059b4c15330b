// The small golden configurations (shared/golden/<stack>.json, "hyperparameters") as pgolf configs:
// the stack's preset with the JSON's dimensions, after checking that the JSON's feature switches are
// the preset's. Each key is read from the JSON; nothing about the shapes is assumed here.
#pragma once

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>

#include "core/config.h"
#include "core/fs.h"
#include "core/tensor.h"
#include "model/batch.h"
#include "model/config.h"
#include "test_util.h"

namespace pgolf::test {

inline nlohmann::json golden_json(const std::string& stack) {
  return nlohmann::json::parse(read_text_file(golden_dir() / (stack + ".json")));
}

inline Config golden_config(const std::string& stack, const nlohmann::json& meta) {
  const nlohmann::json& hp = meta.at("hyperparameters");
  Config c = Config::load(stack == "base" ? "baseline" : stack);
  auto set_int = [&](const std::string& key, const std::string& json_key) {
    if (hp.contains(json_key)) c.set(key, static_cast<int64_t>(hp.at(json_key).get<double>()));
  };
  auto set_double = [&](const std::string& key, const std::string& json_key) {
    if (hp.contains(json_key)) c.set(key, hp.at(json_key).get<double>());
  };
  for (const char* k : {"vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "rope_dims",
                        "xsa_last_n", "bigram_vocab_size", "bigram_dim", "ve_dim", "num_loops", "loop_start",
                        "loop_end", "parallel_start_layer"})
    set_int(k, k);
  for (const char* k : {"mlp_mult", "qk_gain_init", "rope_base", "logit_softcap", "tied_embed_init_std"})
    set_double(k, k);
  // s600 names its direct table bigram_hash_size; its "smear_gate" is the per-block branch gate.
  if (stack == "s600") {
    set_int("bigram_direct_size", "bigram_hash_size");
    EXPECT_EQ(hp.at("smear_gate").get<bool>(), c.get_bool("branch_gates"));
    EXPECT_EQ(hp.at("trigram_hash_size").get<int>(), 0);
  }
  if (hp.contains("ve_layers")) {
    std::vector<int64_t> layers;
    std::string s = hp.at("ve_layers").get<std::string>();
    for (size_t pos = 0; pos < s.size();) {
      size_t comma = s.find(',', pos);
      layers.push_back(std::stoll(s.substr(pos, comma - pos)));
      pos = comma == std::string::npos ? s.size() : comma + 1;
    }
    c.set("ve_layers", layers);
  }
  // The golden S691 script builds Rotary with train_seq_len 64 (patched from 1024) so that the NTK
  // rule is active at T = 128 with the scored run's ratio 2 (golden README, deviations).
  if (stack == "s691") c.set("rope_ntk_ref_len", int64_t{64});
  // Switches the JSON records must agree with the preset's.
  auto same_bool = [&](const std::string& key, const std::string& json_key) {
    if (hp.contains(json_key)) {
      EXPECT_EQ(hp.at(json_key).get<bool>(), c.get_bool(key)) << stack << " " << json_key;
    }
  };
  same_bool("ln_scale", "ln_scale");
  same_bool("value_residual", "value_residual");
  same_bool("gated_attention", "gated_attention");
  same_bool("skip_gates", "skip_gates_enabled");
  same_bool("ve_enabled", "ve_enabled");
  if (hp.contains("rope_yarn")) {
    EXPECT_FALSE(hp.at("rope_yarn").get<bool>());
  }
  return c;
}

// The golden input batch: rows [2, 128] of x / y, or (packed) S1560's training path, one row [1, 256]
// with the script's cu_seqlens.
inline Batch golden_batch(const TensorMap& g, bool packed) {
  Batch b;
  auto x = g.get("x").as<int32_t>();
  auto y = g.get("y").as<int32_t>();
  b.inputs.assign(x.begin(), x.end());
  b.targets.assign(y.begin(), y.end());
  if (packed) {
    // S1560 training path: one packed row [1, 256] with the script's cu_seqlens.
    b.rows = 1;
    b.seq_len = static_cast<int64_t>(x.size());
    auto cu = g.get("cu_seqlens").as<int32_t>();
    b.cu_seqlens.assign(cu.begin(), cu.end());
  } else {
    b.rows = g.get("x").shape[0];
    b.seq_len = g.get("x").shape[1];
  }
  return b;
}

inline ModelConfig golden_model_config(const std::string& stack) {
  return ModelConfig::from_config(golden_config(stack, golden_json(stack)));
}

}  // namespace pgolf::test
