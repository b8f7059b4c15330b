// Whole-model quantization as each reference export does it (SPEC 5.1-5.7): per-tensor routing by
// size, name and category, optional magnitude pruning, then one quantizer per tensor; and the inverse
// (dequantization to the checkpoint's dtypes) that evaluation loads.
#pragma once

#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "quant/prune.h"

namespace pgolf {

// The reference export each preset uses (config key quant_scheme).
enum class QuantScheme {
  Int8,        // BASE: int8 per row, percentile clip                    (quantize_state_dict_int8)
  Int6Rowmax,  // I6/X4/PRoPE: int6 per-row row max for mlp/attn, int8 for the rest
  GptqLite,    // #414/S691: GPTQ-lite int6 for mlp/attn, int8 for the rest  (mixed_quantize_int6)
  MixedInt5,   // I5/S562: int5 mlp, int6 attn/bigram with per-row clip search, int8 for the rest
  Int6Packed,  // S600: int6 per row, percentile clip, bit-packed 4 codes in 3 bytes
  GptqFull,    // #1530/S1560: full GPTQ, int6 matrices and int8 embedding, given Hessians
};
const char* quant_scheme_name(QuantScheme s);
QuantScheme quant_scheme_from_name(const std::string& name);

struct QuantOptions {
  QuantScheme scheme = QuantScheme::Int8;
  int64_t passthrough_max_numel = 65536;  // float tensors with at most this many elements stay float
  bool passthrough_control_fp32 = true;   // ... and control-named ones among them stay fp32
  std::vector<std::string> fp16_keep;     // name substrings kept fp16 whatever their size (mixed schemes)
  double prune_frac = 0.0;                // magnitude pruning of 2-D tensors larger than prune_min_numel
  int64_t prune_min_numel = 65536;
  int int6_range_min = -32;               // Int6Rowmax code range [int6_range_min, 31]
  double int6_scale_floor = 1.0 / 31.0;   // Int6Rowmax scale floor
  int matrix_bits = 6;                    // GptqFull
  int embed_bits = 8;
  double matrix_clip_sigmas = 12.85;
  double embed_clip_sigmas = 20.0;
  int gptq_block_size = 128;
  double gptq_damp = 0.01;

  static QuantOptions from_config(const Config& c);
};

// How one tensor is stored.
enum class QuantMethod {
  Passthrough,     // kept as a float tensor (fp16, or fp32 for control names), non-floats as they are
  PercentileClip,  // SPEC 5.2 (and s600's int6 variant)
  Rowmax,          // SPEC 5.3
  GptqLite,        // SPEC 5.4
  RowSearch,       // SPEC 5.5
  Gptq,            // SPEC 5.7
};
const char* quant_method_name(QuantMethod m);
QuantMethod quant_method_from_name(const std::string& name);

struct TensorPlan {
  std::string name;
  Shape shape;
  DType dtype = DType::F32;         // the checkpoint's dtype, restored by dequantization
  std::string category;             // embed | mlp | attn | bigram | other (SPEC 5.1)
  QuantMethod method = QuantMethod::Passthrough;
  int bits = 0;                     // code width (8, 6, 5) of quantized tensors; 0 for passthrough
  bool packed = false;              // codes stored bit-packed (s600 int6)
  DType stored_dtype = DType::F32;  // passthrough storage dtype
  std::string label;                // the reference export's meta entry: "int6", "passthrough_ctrl", "gptq (int8)", ...
};

// The category of a parameter name (SPEC 5.1); `bigram_category` for the I5/S562 classifier.
std::string quant_category(const std::string& name, bool bigram_category);

// The routing of every tensor of `weights` (in order).
std::vector<TensorPlan> plan_quantization(const TensorMap& weights, const QuantOptions& options);

struct QuantizedTensor {
  TensorPlan plan;
  std::vector<int8_t> codes;  // quantized tensors: one code per element, row-major (unpacked)
  HostTensor scale;           // quantized tensors: F16 [rows], or a 0-dim F16/F32 scalar
  HostTensor passthrough;     // passthrough tensors, in plan.stored_dtype
};

struct QuantizedModel {
  std::vector<QuantizedTensor> tensors;
  std::vector<PruneRecord> pruned;
};

// Quantizes float weights (names as the reference state dicts; banked models must be unbanked first).
// `hessians` (tensors "hessian/<weight name>") is required by GptqFull and ignored otherwise.
QuantizedModel quantize_model(const TensorMap& weights, const QuantOptions& options,
                              const TensorMap* hessians = nullptr);

// The dequantized tensor (q * scale row-wise in fp32, or the passthrough cast back) in plan.dtype.
HostTensor dequantize_tensor(const QuantizedTensor& t);
TensorMap dequantize_model(const QuantizedModel& m);

}  // namespace pgolf
