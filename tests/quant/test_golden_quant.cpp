// Every stack's export against the reference's own quantizer output (golden/*.safetensors): codes,
// fp16 scales, passthrough tensors (dtype too), s600 packed bytes, s562 pruning thresholds and the
// dequantized weights must be equal bit for bit, and each tensor's routing must equal the reference's
// meta entry. The golden files were made with scaled-down size thresholds (golden README), set here.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/half.h"
#include "core/safetensors.h"
#include "quant/banks.h"
#include "quant/int6_pack.h"
#include "quant/quantize.h"
#include "test_util.h"

using namespace pgolf;
using json = nlohmann::json;

namespace {

struct GoldenStack {
  std::string name;    // golden file stem
  std::string preset;  // our preset
  std::vector<std::string> settings;  // the golden README's scaled thresholds
};

const GoldenStack kStacks[] = {
    {"base", "baseline", {"passthrough_max_numel=1024"}},
    {"s691", "s691", {"passthrough_max_numel=1024"}},
    {"s562", "s562", {"passthrough_max_numel=512", "prune_min_numel=1024"}},
    {"s600", "s600", {"passthrough_max_numel=1024"}},
    {"s1560", "s1560", {"passthrough_max_numel=1024"}},
};

void PrintTo(const GoldenStack& s, std::ostream* os) { *os << s.name; }

json load_json(const std::filesystem::path& p) {
  std::ifstream f(p);
  return json::parse(f);
}

// The reference meta entry as our label: a string as it is, {"type": T, ...} as T.
std::string reference_label(const json& meta) { return meta.is_string() ? meta.get<std::string>() : meta.at("type").get<std::string>(); }

std::string bits_str(const HostTensor& a) { return dtype_name(a.dtype) + std::string(" ") + shape_str(a.shape); }

class GoldenQuant : public ::testing::TestWithParam<GoldenStack> {
 protected:
  void SetUp() override {
    const auto& s = GetParam();
    golden_ = load_safetensors(test::golden_dir() / (s.name + ".safetensors"));
    info_ = load_json(test::golden_dir() / (s.name + ".json"));
    Config cfg = Config::load(s.preset);
    for (auto& kv : s.settings) cfg.set_from_string(kv);
    options_ = QuantOptions::from_config(cfg);
    // The state dict the reference quantized, in its order (s1560: unbanked).
    TensorMap params;
    for (const auto& name : golden_.names())
      if (name.find('/') == std::string::npos) params.set(name, golden_.get(name));
    if (has_banks(params)) params = unbank(params);
    for (auto it = info_["quant"]["meta"].begin(); it != info_["quant"]["meta"].end(); ++it) {
      ASSERT_TRUE(params.has(it.key())) << it.key();
      weights_.set(it.key(), params.get(it.key()));
    }
    if (s.name == "s1560") hessians_ = load_safetensors(test::golden_dir() / "s1560_hessians.safetensors");
  }

  TensorMap golden_, weights_, hessians_;
  json info_;
  QuantOptions options_;
};

TEST_P(GoldenQuant, CodesScalesPassthroughAndDequantizedWeightsAreBitExact) {
  const auto& s = GetParam();
  QuantizedModel m = quantize_model(weights_, options_, s.name == "s1560" ? &hessians_ : nullptr);
  ASSERT_EQ(m.tensors.size(), info_["quant"]["meta"].size());
  int64_t codes_compared = 0, quantized = 0, passed = 0;
  for (const auto& t : m.tensors) {
    const std::string& n = t.plan.name;
    SCOPED_TRACE(s.name + " " + n);
    const json& meta = info_["quant"]["meta"][n];
    EXPECT_EQ(t.plan.label, reference_label(meta));
    if (meta.is_object() && meta.contains("stored_dtype")) {
      EXPECT_EQ(t.plan.stored_dtype, meta["stored_dtype"] == "float32" ? DType::F32 : DType::F16);
    }
    if (t.plan.method == QuantMethod::Passthrough) {
      ++passed;
      const HostTensor& ref = golden_.get("quant/" + n + ".passthrough");
      EXPECT_EQ(t.passthrough.dtype, ref.dtype);
      EXPECT_EQ(t.passthrough.shape, ref.shape);
      EXPECT_TRUE(t.passthrough.bytes == ref.bytes) << "passthrough bytes differ";
    } else {
      ++quantized;
      const auto ref_q = golden_.get("quant/" + n + ".q").as<int8_t>();
      const HostTensor& ref_s = golden_.get("quant/" + n + ".scale");
      ASSERT_EQ(t.codes.size(), ref_q.size());
      int64_t mismatches = 0;
      for (size_t i = 0; i < ref_q.size(); ++i)
        if (t.codes[i] != ref_q[i] && mismatches++ < 3)
          ADD_FAILURE() << "code " << i << ": " << int(t.codes[i]) << " vs reference " << int(ref_q[i]);
      EXPECT_EQ(mismatches, 0);
      codes_compared += static_cast<int64_t>(ref_q.size());
      EXPECT_EQ(bits_str(t.scale), bits_str(ref_s));
      EXPECT_TRUE(t.scale.bytes == ref_s.bytes) << "scales differ";
      if (golden_.has("quant/" + n + ".packed")) {
        EXPECT_TRUE(pack_int6(t.codes) == golden_.get("quant/" + n + ".packed").bytes) << "packed bytes differ";
      }
    }
    const HostTensor deq = dequantize_tensor(t);
    const HostTensor& ref_deq = golden_.get("deq/" + n);
    EXPECT_EQ(bits_str(deq), bits_str(ref_deq));
    EXPECT_TRUE(deq.bytes == ref_deq.bytes) << "dequantized weights differ";
  }
  EXPECT_GT(quantized, 0);
  EXPECT_GT(passed, 0);
  EXPECT_GT(codes_compared, 100000);
}

TEST_P(GoldenQuant, PruningThresholdsAreBitExact) {
  const auto& s = GetParam();
  const json& prune = info_["quant"]["prune"];
  QuantizedModel m = quantize_model(weights_, options_, s.name == "s1560" ? &hessians_ : nullptr);
  if (prune.is_null()) {
    EXPECT_TRUE(m.pruned.empty());
    return;
  }
  ASSERT_EQ(m.pruned.size(), prune.size());
  for (const auto& r : m.pruned) {
    SCOPED_TRACE(r.name);
    ASSERT_TRUE(prune.contains(r.name));
    const float ref = golden_.get("prune/" + r.name + ".threshold").as<float>()[0];
    EXPECT_EQ(f32_bits(r.threshold), f32_bits(ref)) << r.threshold << " vs " << ref;
    EXPECT_EQ(r.zeroed, prune[r.name]["n_zeroed"].get<int64_t>());
    EXPECT_EQ(r.numel, prune[r.name]["numel"].get<int64_t>());
  }
}

INSTANTIATE_TEST_SUITE_P(Stacks, GoldenQuant, ::testing::ValuesIn(kStacks),
                         [](const auto& info) { return info.param.name; });

TEST(GoldenQuant, BanksRoundTripThroughUnbankedNames) {
  TensorMap g = load_safetensors(test::golden_dir() / "s1560.safetensors");
  TensorMap banks;
  for (const char* b : {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"}) banks.set(b, g.get(b));
  TensorMap u = unbank(banks);
  EXPECT_EQ(u.size(), 11u * 6u);
  // Slices land where the golden README's table puts them: O half of qo_bank = attn.proj.
  const auto proj3 = u.get("blocks.3.attn.proj.weight").as<float>();
  const auto qo = g.get("qo_bank").as<float>();
  ASSERT_EQ(proj3.size(), 64u * 64u);
  EXPECT_EQ(proj3[5], qo[(11 + 3) * 64 * 64 + 5]);
  const auto v10 = u.get("blocks.10.attn.c_v.weight");
  EXPECT_EQ(v10.shape, (Shape{32, 64}));
  EXPECT_EQ(v10.as<float>()[7], g.get("kv_bank").as<float>()[(11 + 10) * 32 * 64 + 7]);
  TensorMap back = rebank(u, 11);
  ASSERT_EQ(back.size(), 4u);
  for (const auto& n : banks.names()) {
    EXPECT_EQ(back.get(n).shape, banks.get(n).shape) << n;
    EXPECT_TRUE(back.get(n).bytes == banks.get(n).bytes) << n;
  }
}

}  // namespace
