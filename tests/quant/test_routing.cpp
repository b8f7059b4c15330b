// Per-tensor routing (SPEC 5.1) on hand-made state dicts: categories, size thresholds, control names,
// fp16 keep-lists, non-float tensors, and the dtype restored by dequantization.
#include <gtest/gtest.h>

#include "core/config.h"
#include "core/half.h"
#include "quant/quantize.h"

using namespace pgolf;

namespace {

HostTensor filled(Shape s, float v, DType dtype = DType::F32) {
  HostTensor t(DType::F32, s);
  for (auto& x : t.as<float>()) x = v;
  if (dtype == DType::F32) return t;
  HostTensor c(dtype, s);
  auto* bits = reinterpret_cast<uint16_t*>(c.bytes.data());
  for (int64_t i = 0; i < c.numel(); ++i) bits[i] = dtype == DType::BF16 ? f32_to_bf16_bits(v) : f32_to_f16_bits(v);
  return c;
}

const TensorPlan& plan_of(const std::vector<TensorPlan>& plans, const std::string& name) {
  for (auto& p : plans)
    if (p.name == name) return p;
  throw std::runtime_error("no plan for " + name);
}

TensorMap sample_state() {
  TensorMap m;
  m.set("tok_emb.weight", filled({64, 32}, 0.1f));
  m.set("bigram.embed.weight", filled({64, 32}, 0.1f));
  m.set("bigram.proj.weight", filled({64, 32}, 0.1f));
  m.set("blocks.0.attn.c_q.weight", filled({64, 32}, 0.1f));
  m.set("blocks.0.mlp.fc.weight", filled({64, 32}, 0.1f));
  m.set("blocks.8.attn.c_k.weight", filled({64, 32}, 0.1f));
  m.set("blocks.0.resid_mix", filled({64, 32}, 1.0f));  // a control name above the threshold
  m.set("blocks.0.attn_scale", filled({32}, 1.0f));     // a small control tensor
  m.set("smear.gate", filled({32}, 0.0f));
  m.set("step", HostTensor::from<int64_t>({}, std::vector<int64_t>{7}));
  return m;
}

}  // namespace

TEST(Routing, CategoriesByName) {
  EXPECT_EQ(quant_category("tok_emb.weight", false), "embed");
  EXPECT_EQ(quant_category("lm_head.weight", false), "embed");
  EXPECT_EQ(quant_category("blocks.3.mlp.proj.weight", false), "mlp");
  EXPECT_EQ(quant_category("blocks.3.attn.proj.weight", false), "attn");
  EXPECT_EQ(quant_category("bigram.proj.weight", false), "attn");  // ".proj." outside an MLP
  EXPECT_EQ(quant_category("bigram.proj.weight", true), "bigram");
  EXPECT_EQ(quant_category("bigram.embed.weight", false), "other");
  EXPECT_EQ(quant_category("ve_shared.embed.weight", false), "other");
}

TEST(Routing, MixedSchemesPassthroughControlKeepListAndCategories) {
  QuantOptions o;
  o.scheme = QuantScheme::MixedInt5;
  o.passthrough_max_numel = 512;
  o.passthrough_control_fp32 = false;
  o.fp16_keep = {"tok_emb", "blocks.8.attn.c_k"};
  const auto plans = plan_quantization(sample_state(), o);
  EXPECT_EQ(plan_of(plans, "tok_emb.weight").label, "passthrough_fp16");
  EXPECT_EQ(plan_of(plans, "blocks.8.attn.c_k.weight").label, "passthrough_fp16");
  EXPECT_EQ(plan_of(plans, "bigram.embed.weight").label, "int6");
  EXPECT_EQ(plan_of(plans, "bigram.proj.weight").label, "int6");
  EXPECT_EQ(plan_of(plans, "blocks.0.attn.c_q.weight").label, "int6");
  EXPECT_EQ(plan_of(plans, "blocks.0.mlp.fc.weight").label, "int5");
  EXPECT_EQ(plan_of(plans, "blocks.0.mlp.fc.weight").bits, 5);
  EXPECT_EQ(plan_of(plans, "blocks.0.resid_mix").label, "passthrough_ctrl");
  EXPECT_EQ(plan_of(plans, "blocks.0.resid_mix").stored_dtype, DType::F32);
  EXPECT_EQ(plan_of(plans, "blocks.0.attn_scale").stored_dtype, DType::F16);
  EXPECT_EQ(plan_of(plans, "step").method, QuantMethod::Passthrough);
  EXPECT_EQ(plan_of(plans, "step").stored_dtype, DType::I64);

  o.scheme = QuantScheme::GptqLite;  // no bigram category, no fp16 keep in the #414 export
  o.fp16_keep.clear();
  const auto lite = plan_quantization(sample_state(), o);
  EXPECT_EQ(plan_of(lite, "tok_emb.weight").label, "int8");
  EXPECT_EQ(plan_of(lite, "bigram.embed.weight").label, "int8");
  EXPECT_EQ(plan_of(lite, "bigram.proj.weight").method, QuantMethod::GptqLite);
  EXPECT_EQ(plan_of(lite, "blocks.0.mlp.fc.weight").label, "int6");

  o.scheme = QuantScheme::Int6Rowmax;
  EXPECT_EQ(plan_of(plan_quantization(sample_state(), o), "blocks.0.attn.c_q.weight").method, QuantMethod::Rowmax);
}

TEST(Routing, Int8DictAndGptqSchemes) {
  QuantOptions o;
  o.scheme = QuantScheme::Int8;
  o.passthrough_max_numel = 512;
  o.passthrough_control_fp32 = true;
  const auto plans = plan_quantization(sample_state(), o);
  EXPECT_EQ(plan_of(plans, "blocks.0.attn_scale").stored_dtype, DType::F32);  // control: fp32
  EXPECT_EQ(plan_of(plans, "smear.gate").stored_dtype, DType::F16);
  EXPECT_EQ(plan_of(plans, "blocks.0.resid_mix").label, "int8");  // large control tensors are quantized here
  EXPECT_EQ(plan_of(plans, "tok_emb.weight").method, QuantMethod::PercentileClip);

  o.scheme = QuantScheme::Int6Packed;
  const auto packed = plan_quantization(sample_state(), o);
  EXPECT_EQ(plan_of(packed, "blocks.0.mlp.fc.weight").label, "int6_packed");
  EXPECT_TRUE(plan_of(packed, "blocks.0.mlp.fc.weight").packed);

  o.scheme = QuantScheme::GptqFull;
  o.passthrough_control_fp32 = false;
  const auto gptq = plan_quantization(sample_state(), o);
  EXPECT_EQ(plan_of(gptq, "tok_emb.weight").label, "gptq (int8)");
  EXPECT_EQ(plan_of(gptq, "blocks.0.attn.c_q.weight").label, "gptq (int6)");
  EXPECT_EQ(plan_of(gptq, "blocks.0.attn_scale").label, "passthrough (float16)");
}

TEST(Routing, PresetsSelectTheirReferenceExports) {
  EXPECT_EQ(QuantOptions::from_config(Config::load("baseline")).scheme, QuantScheme::Int8);
  EXPECT_EQ(QuantOptions::from_config(Config::load("s691")).scheme, QuantScheme::GptqLite);
  const auto s562 = QuantOptions::from_config(Config::load("s562"));
  EXPECT_EQ(s562.scheme, QuantScheme::MixedInt5);
  EXPECT_EQ(s562.passthrough_max_numel, 8192);
  EXPECT_DOUBLE_EQ(s562.prune_frac, 0.03);
  EXPECT_EQ(s562.fp16_keep, (std::vector<std::string>{"tok_emb.weight", "blocks.8.attn.c_k.weight"}));
  EXPECT_EQ(QuantOptions::from_config(Config::load("s600")).scheme, QuantScheme::Int6Packed);
  EXPECT_EQ(QuantOptions::from_config(Config::load("s1560")).scheme, QuantScheme::GptqFull);
  Config bad = Config::load("baseline");
  bad.set_from_string("quant_scheme=\"int4\"");
  EXPECT_THROW(QuantOptions::from_config(bad), Error);
}

TEST(Dequantize, RestoresTheCheckpointDtype) {
  TensorMap m;
  m.set("blocks.0.mlp.fc.weight", filled({8, 200}, 0.25f, DType::BF16));
  m.set("blocks.0.attn_scale", filled({8}, 0.5f, DType::BF16));
  QuantOptions o;
  o.scheme = QuantScheme::Int8;
  o.passthrough_max_numel = 16;
  QuantizedModel q = quantize_model(m, o);
  TensorMap d = dequantize_model(q);
  EXPECT_EQ(d.get("blocks.0.mlp.fc.weight").dtype, DType::BF16);
  EXPECT_EQ(d.get("blocks.0.attn_scale").dtype, DType::BF16);
  EXPECT_EQ(q.tensors[1].passthrough.dtype, DType::F32);  // a control name, kept fp32
  EXPECT_EQ(d.get("blocks.0.attn_scale").to_f32()[3], 0.5f);
  EXPECT_NEAR(d.get("blocks.0.mlp.fc.weight").to_f32()[5], 0.25f, 1.0f / 127);  // one int8 step
}
