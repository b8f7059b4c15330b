#include "quant/quantize.h"

#include <sstream>

#include "core/half.h"
#include "quant/gptq.h"
#include "quant/rowwise.h"

namespace pgolf {

namespace {

// The references' CONTROL_TENSOR_NAME_PATTERNS (substring match). The mixed-export scripts extend the
// list with names (smear, bigram.scale, vr_lambda, ve scales, ...) that are below the passthrough
// threshold in every preset, so the extension never changes a routing.
constexpr const char* kControlPatterns[] = {"attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix",
                                            "resid_mixes", "q_gain", "skip_weight", "skip_weights"};

bool is_control_name(const std::string& name) {
  for (const char* p : kControlPatterns)
    if (name.find(p) != std::string::npos) return true;
  return false;
}

bool is_float(DType t) { return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16; }

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// The references' three export families.
enum class Family { Int8Dict, Mixed, Gptq };
Family family_of(QuantScheme s) {
  switch (s) {
    case QuantScheme::Int8: case QuantScheme::Int6Packed: return Family::Int8Dict;
    case QuantScheme::GptqFull: return Family::Gptq;
    default: return Family::Mixed;
  }
}

TensorPlan plan_tensor(const std::string& name, const HostTensor& t, const QuantOptions& o) {
  TensorPlan p;
  p.name = name;
  p.shape = t.shape;
  p.dtype = t.dtype;
  p.category = quant_category(name, o.scheme == QuantScheme::MixedInt5);
  const Family family = family_of(o.scheme);
  auto passthrough = [&](DType stored, const char* label) {
    p.method = QuantMethod::Passthrough;
    p.stored_dtype = stored;
    p.label = label;
    return p;
  };
  auto quantized = [&](QuantMethod m, int bits, std::string label) {
    p.method = m;
    p.bits = bits;
    p.label = std::move(label);
    return p;
  };
  if (!is_float(t.dtype)) return passthrough(t.dtype, "passthrough");
  if (t.numel() <= o.passthrough_max_numel) {
    const bool keep_fp32 = o.passthrough_control_fp32 && is_control_name(name);
    // The int8-dict export leaves fp16/fp64 small tensors as they are; the others cast every one to fp16.
    const bool cast = family != Family::Int8Dict || t.dtype == DType::F32 || t.dtype == DType::BF16;
    const DType stored = keep_fp32 ? DType::F32 : (cast ? DType::F16 : t.dtype);
    return passthrough(stored, family == Family::Gptq ? "passthrough (float16)" : "passthrough");
  }
  if (family == Family::Mixed) {
    if (is_control_name(name)) return passthrough(DType::F32, "passthrough_ctrl");
    for (const auto& keep : o.fp16_keep)
      if (contains(name, keep.c_str())) return passthrough(DType::F16, "passthrough_fp16");
  }
  const bool block_matrix = p.category == "mlp" || p.category == "attn";
  switch (o.scheme) {
    case QuantScheme::Int8: return quantized(QuantMethod::PercentileClip, 8, "int8");
    case QuantScheme::Int6Packed:
      p.packed = true;
      return quantized(QuantMethod::PercentileClip, 6, "int6_packed");
    case QuantScheme::Int6Rowmax:
      if (block_matrix) return quantized(QuantMethod::Rowmax, 6, "int6");
      return quantized(QuantMethod::PercentileClip, 8, "int8");
    case QuantScheme::GptqLite:
      if (block_matrix) return quantized(QuantMethod::GptqLite, 6, "int6");
      return quantized(QuantMethod::PercentileClip, 8, "int8");
    case QuantScheme::MixedInt5:
      if (p.category == "mlp") return quantized(QuantMethod::RowSearch, 5, "int5");
      if (p.category == "attn" || p.category == "bigram") return quantized(QuantMethod::RowSearch, 6, "int6");
      return quantized(QuantMethod::PercentileClip, 8, "int8");
    case QuantScheme::GptqFull: {
      const int bits = contains(name, "tok_emb") ? o.embed_bits : o.matrix_bits;
      return quantized(QuantMethod::Gptq, bits, "gptq (int" + std::to_string(bits) + ")");
    }
  }
  fail("unhandled quant scheme");
}

HostTensor float_tensor(DType dtype, const Shape& shape, std::span<const float> v) {
  HostTensor t(dtype, shape);
  switch (dtype) {
    case DType::F32: std::copy(v.begin(), v.end(), t.as<float>().begin()); break;
    case DType::F64: std::copy(v.begin(), v.end(), t.as<double>().begin()); break;
    case DType::F16: {
      auto* bits = reinterpret_cast<uint16_t*>(t.bytes.data());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = f32_to_f16_bits(v[i]);
      break;
    }
    case DType::BF16: {
      auto* bits = reinterpret_cast<uint16_t*>(t.bytes.data());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = f32_to_bf16_bits(v[i]);
      break;
    }
    default: fail("float_tensor: {} is not a float dtype", dtype_name(dtype));
  }
  return t;
}

ScaledCodes quantize_values(const TensorPlan& p, std::span<const float> w, const QuantOptions& o,
                            const TensorMap* hessians) {
  const int clip_range = (1 << (p.bits - 1)) - 1;  // 127, 31, 15
  switch (p.method) {
    case QuantMethod::PercentileClip:
      // int8: codes [-127, 127]; s600's int6: [-31, 30] (its clamp(-clip_val, clip_val - 1)).
      return p.bits == 8 ? quantize_percentile_clip(w, p.shape, 127, -127, 127)
                         : quantize_percentile_clip(w, p.shape, clip_range, -clip_range, clip_range - 1);
    case QuantMethod::Rowmax:
      return quantize_rowmax(w, p.shape, clip_range, o.int6_range_min, static_cast<float>(o.int6_scale_floor));
    case QuantMethod::GptqLite: return quantize_gptq_lite(w, p.shape, clip_range);
    case QuantMethod::RowSearch: return quantize_row_search(w, p.shape, clip_range);
    case QuantMethod::Gptq: {
      const std::string key = "hessian/" + p.name;
      PG_CHECK(hessians != nullptr, "quant_scheme gptq_full needs Hessians (tensors 'hessian/<weight name>'), "
               "none were given");
      PG_CHECK(hessians->has(key), "quant_scheme gptq_full: no Hessian '{}' for weight '{}' of shape {}", key, p.name,
               shape_str(p.shape));
      const auto h = hessians->get(key).to_f32();
      GptqOptions g;
      g.clip_range = clip_range;
      g.clip_sigmas = contains(p.name, "tok_emb") ? o.embed_clip_sigmas : o.matrix_clip_sigmas;
      g.block_size = o.gptq_block_size;
      g.damp = o.gptq_damp;
      return quantize_gptq(w, p.shape, h, g, p.name);
    }
    case QuantMethod::Passthrough: break;
  }
  fail("quantize_values: '{}' is a passthrough tensor", p.name);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

const char* quant_scheme_name(QuantScheme s) {
  switch (s) {
    case QuantScheme::Int8: return "int8";
    case QuantScheme::Int6Rowmax: return "int6_rowmax";
    case QuantScheme::GptqLite: return "gptq_lite";
    case QuantScheme::MixedInt5: return "mixed_int5";
    case QuantScheme::Int6Packed: return "int6_packed";
    case QuantScheme::GptqFull: return "gptq_full";
  }
  return "?";
}

QuantScheme quant_scheme_from_name(const std::string& name) {
  for (auto s : {QuantScheme::Int8, QuantScheme::Int6Rowmax, QuantScheme::GptqLite, QuantScheme::MixedInt5,
                 QuantScheme::Int6Packed, QuantScheme::GptqFull})
    if (name == quant_scheme_name(s)) return s;
  fail("quant_scheme '{}' is not one of int8, int6_rowmax, gptq_lite, mixed_int5, int6_packed, gptq_full", name);
}

const char* quant_method_name(QuantMethod m) {
  switch (m) {
    case QuantMethod::Passthrough: return "passthrough";
    case QuantMethod::PercentileClip: return "percentile_clip";
    case QuantMethod::Rowmax: return "rowmax";
    case QuantMethod::GptqLite: return "gptq_lite";
    case QuantMethod::RowSearch: return "row_search";
    case QuantMethod::Gptq: return "gptq";
  }
  return "?";
}

QuantMethod quant_method_from_name(const std::string& name) {
  for (auto m : {QuantMethod::Passthrough, QuantMethod::PercentileClip, QuantMethod::Rowmax, QuantMethod::GptqLite,
                 QuantMethod::RowSearch, QuantMethod::Gptq})
    if (name == quant_method_name(m)) return m;
  fail("unknown quantization method '{}'", name);
}

QuantOptions QuantOptions::from_config(const Config& c) {
  QuantOptions o;
  o.scheme = quant_scheme_from_name(c.get_string("quant_scheme"));
  o.passthrough_max_numel = c.get_int("passthrough_max_numel");
  o.passthrough_control_fp32 = c.get_bool("passthrough_control_fp32");
  o.fp16_keep = split_list(c.get_string("fp16_keep"));
  o.prune_frac = c.get_double("prune_frac");
  o.prune_min_numel = c.get_int("prune_min_numel");
  o.int6_range_min = static_cast<int>(c.get_int("int6_range_min"));
  o.int6_scale_floor = c.get_double("int6_scale_floor");
  o.matrix_bits = static_cast<int>(c.get_int("matrix_bits"));
  o.embed_bits = static_cast<int>(c.get_int("embed_bits"));
  o.matrix_clip_sigmas = c.get_double("matrix_clip_sigmas");
  o.embed_clip_sigmas = c.get_double("embed_clip_sigmas");
  o.gptq_block_size = static_cast<int>(c.get_int("gptq_block_size"));
  o.gptq_damp = c.get_double("gptq_damp");
  PG_CHECK(o.prune_frac >= 0.0 && o.prune_frac < 1.0, "prune_frac = {} must be in [0, 1)", o.prune_frac);
  PG_CHECK(o.int6_range_min == -32 || o.int6_range_min == -31, "int6_range_min = {} must be -32 or -31",
           o.int6_range_min);
  for (int bits : {o.matrix_bits, o.embed_bits})
    PG_CHECK(bits >= 2 && bits <= 8, "matrix_bits / embed_bits = {} must be in [2, 8]", bits);
  PG_CHECK(o.gptq_block_size > 0, "gptq_block_size = {} must be positive", o.gptq_block_size);
  return o;
}

std::string quant_category(const std::string& name, bool bigram_category) {
  if (contains(name, "tok_emb") || contains(name, "lm_head")) return "embed";
  if (contains(name, ".mlp.")) return "mlp";
  if (bigram_category && contains(name, "bigram")) return "bigram";
  if (contains(name, ".attn.") || contains(name, ".proj.")) return "attn";
  return "other";
}

std::vector<TensorPlan> plan_quantization(const TensorMap& weights, const QuantOptions& options) {
  std::vector<TensorPlan> out;
  for (const auto& name : weights.names()) out.push_back(plan_tensor(name, weights.get(name), options));
  return out;
}

QuantizedModel quantize_model(const TensorMap& weights, const QuantOptions& options, const TensorMap* hessians) {
  QuantizedModel m;
  const auto plans = plan_quantization(weights, options);
  // fp32 working copies of the float tensors (pruning edits them; the quantizers read them).
  TensorMap work;
  for (const auto& p : plans)
    if (is_float(p.dtype)) work.set(p.name, float_tensor(DType::F32, p.shape, weights.get(p.name).to_f32()));
  if (options.prune_frac > 0.0)
    m.pruned = prune_state(work, static_cast<float>(options.prune_frac), options.prune_min_numel);
  auto was_pruned = [&](const std::string& name) {
    for (const auto& r : m.pruned)
      if (r.name == name) return true;
    return false;
  };
  for (const auto& p : plans) {
    QuantizedTensor q;
    q.plan = p;
    if (p.method == QuantMethod::Passthrough) {
      // Kept in its own dtype: the original bytes, unless pruning changed them.
      const bool original = !is_float(p.dtype) || (p.stored_dtype == p.dtype && !was_pruned(p.name));
      q.passthrough = original ? weights.get(p.name)
                               : float_tensor(p.stored_dtype, p.shape, work.get(p.name).as<float>());
    } else {
      ScaledCodes sc = quantize_values(p, work.get(p.name).as<float>(), options, hessians);
      q.codes = std::move(sc.codes);
      q.scale = std::move(sc.scale);
    }
    m.tensors.push_back(std::move(q));
  }
  return m;
}

HostTensor dequantize_tensor(const QuantizedTensor& t) {
  const TensorPlan& p = t.plan;
  if (p.method == QuantMethod::Passthrough) {
    if (!is_float(p.dtype) || t.passthrough.dtype == p.dtype) return t.passthrough;
    return float_tensor(p.dtype, p.shape, t.passthrough.to_f32());
  }
  return float_tensor(p.dtype, p.shape, dequantize_codes(t.codes, t.scale, p.shape));
}

TensorMap dequantize_model(const QuantizedModel& m) {
  TensorMap out;
  for (const auto& t : m.tensors) out.set(t.plan.name, dequantize_tensor(t));
  return out;
}

}  // namespace pgolf
