// A golden stack at its small configuration: the preset with the golden JSON's hyperparameters
// applied, its parameter layout from the real ModelConfig/param_specs rules, and the dumped tensors.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "core/config.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/params.h"
#include "test_util.h"

namespace pgolf::test {

struct GoldenStack {
  Config config;
  ParamLayout layout;
  TensorMap tensors;
  nlohmann::json meta;
};

// Tensors named "<prefix><param>" as the parameter set (e.g. prefix "grad/").
inline ParamSet<float> golden_params(const GoldenStack& g, const std::string& prefix) {
  TensorMap picked;
  for (size_t i = 0; i < g.layout.size(); ++i) {
    const std::string& name = g.layout.spec(i).name;
    picked.set(name, g.tensors.get(prefix + name));
  }
  ParamSet<float> out(g.layout);
  out.load_tensors(picked, "golden " + prefix);
  return out;
}

// `preset` = "s691" or "s1560"; reads golden/<preset>.json and .safetensors.
inline GoldenStack load_golden_stack(const std::string& preset) {
  GoldenStack g{Config::load(preset), {}, {}, {}};
  g.meta = nlohmann::json::parse(read_text_file(golden_dir() / (preset + ".json")));
  const nlohmann::json& h = g.meta.at("hyperparameters");
  // The small model and the optimizer hyperparameters exactly as the golden run had them.
  for (const char* key : {"vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "rope_dims",
                          "bigram_vocab_size", "bigram_dim", "ve_dim", "xsa_last_n", "num_loops", "loop_start",
                          "loop_end", "parallel_start_layer", "muon_backend_steps", "muon_momentum_warmup_steps"}) {
    if (h.contains(key)) g.config.set(key, h.at(key).get<int64_t>());
  }
  for (const char* key : {"mlp_mult", "qk_gain_init", "tied_embed_lr", "matrix_lr", "scalar_lr", "adam_wd",
                          "muon_wd", "embed_wd", "beta1", "beta2", "adam_eps", "grad_clip_norm", "muon_momentum",
                          "muon_momentum_warmup_start"}) {
    if (h.contains(key)) g.config.set(key, h.at(key).get<double>());
  }
  if (h.contains("muon_row_normalize")) g.config.set("muon_row_normalize", h.at("muon_row_normalize").get<bool>());
  if (h.contains("ve_layers")) {  // "9,10"
    std::vector<int64_t> layers;
    std::string s = h.at("ve_layers").get<std::string>();
    for (size_t pos = 0; pos < s.size();) {
      size_t comma = s.find(',', pos);
      layers.push_back(std::stoll(s.substr(pos, comma - pos)));
      pos = comma == std::string::npos ? s.size() : comma + 1;
    }
    g.config.set("ve_layers", layers);
  }
  g.layout = ParamLayout(param_specs(ModelConfig::from_config(g.config)));
  g.tensors = load_safetensors(golden_dir() / (preset + ".safetensors"));
  return g;
}

}  // namespace pgolf::test
