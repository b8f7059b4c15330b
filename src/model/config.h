// ModelConfig: the architecture of one configurable GPT covering the reference stacks (SPEC §3),
// and the parameter list under the reference state-dict names (SPEC §3.11 for the init rules).
// Both the CPU reference and the CUDA engine build from this one description.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"

namespace pgolf {

enum class Activation { Relu2, Leaky2 };
enum class InitStyle { Default, Ortho, OrthoBanked };

// Optimizer group of a parameter (SPEC §4.1 membership rules).
enum class ParamGroup { Embed, Matrix, Scalar };
const char* param_group_name(ParamGroup g);

// How a parameter is initialised (SPEC §3.11).
enum class InitKind {
  Zeros,
  Ones,
  Constant,       // every element = init_value
  Normal,         // N(0, init_value^2)
  LinearDefault,  // nn.Linear default: U(-1/sqrt(in), 1/sqrt(in)), in = last dim
  Orthogonal,     // orthogonal_ (per bank slice for 3-D banks), times init_value
  ResidMix,       // [2, d]: row 0 = 1, row 1 = 0
};

struct ParamSpec {
  std::string name;  // reference state-dict name
  Shape shape;
  ParamGroup group;
  InitKind init;
  double init_value = 0.0;
  int64_t zero_slices_from = -1;  // 3-D banks: slices >= this index are zero (qo_bank's O half)
  int64_t numel() const { return shape_numel(shape); }
};

struct ModelConfig {
  int vocab_size = 1024;
  int num_layers = 9;
  int model_dim = 512;
  int num_heads = 8;
  int num_kv_heads = 4;
  int head_dim = 64;
  int mlp_hidden = 1024;
  Activation activation = Activation::Relu2;
  double leaky_slope = 0.5;
  double logit_softcap = 30.0;
  double rope_base = 10000.0;
  int rope_dims = 64;        // rotary dims per head (<= head_dim, even)
  int rope_ntk_ref_len = 0;  // >0: NTK base scaling for T > ref
  double qk_gain_init = 1.5;
  bool ln_scale = false;
  bool smear_gate = false;
  int bigram_vocab_size = 0;
  int bigram_dim = 128;
  bool trigram_hash = false;
  int bigram_direct_size = 0;
  bool branch_gates = false;
  int xsa_last_n = 0;
  bool ve_enabled = false;
  int ve_dim = 128;
  std::vector<int> ve_layers;
  bool value_residual = false;
  bool value_residual_layer0_mix = true;
  bool gated_attention = false;
  double gated_attention_bias_init = 4.0;
  bool skip_gates = false;
  int num_loops = 0;
  int loop_start = 3;
  int loop_end = 5;
  int parallel_start_layer = -1;
  bool param_banks = false;
  InitStyle init_style = InitStyle::Default;
  double tied_embed_init_std = 0.005;

  static ModelConfig from_config(const Config& c);  // validates shapes and switches

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  bool xsa_on(int layer) const { return layer >= num_layers - xsa_last_n; }
  bool ve_on(int layer) const;
  int ve_index(int layer) const;  // position of `layer` in ve_layers, -1 if none
  // RoPE base at sequence length T (NTK rule: base * (T/ref)^(rd/(rd-2)) when ref > 0 and T > ref).
  double rope_base_at(int seq_len) const;
  bool has_looping() const { return num_loops > 0; }

  // Virtual layer order (physical index per virtual position) and its encoder/decoder split.
  struct LayerPlan {
    std::vector<int> encoder;  // pushed on the skip stack
    std::vector<int> decoder;  // decoder k pops skip k (if any left)
    int num_skips = 0;         // skip vectors used by this plan
  };
  LayerPlan layer_plan(bool looping) const;
  int num_skip_params() const;  // rows of skip_weights (= skips of the looped plan when looping exists)
  // Parallel residual lanes for decoder layers at or after parallel_start_layer; the reference
  // tests `i >= psl and psl > 0`, so 0 (like -1) means off.
  bool parallel_on(int physical_layer) const {
    return parallel_start_layer > 0 && physical_layer >= parallel_start_layer;
  }
};

std::vector<ParamSpec> param_specs(const ModelConfig& m);
int64_t param_count(const ModelConfig& m);

}  // namespace pgolf
