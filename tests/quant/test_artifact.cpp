// The artifact format: every scheme and every compressor round-trips (pack -> unpack gives the
// dequantized tensors exactly, under the checkpoint's names and order), and damaged files are refused
// with a message that says what is wrong.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <zlib.h>

#include <cstring>
#include <functional>

#include "core/safetensors.h"
#include "quant/artifact.h"
#include "quant/pack.h"
#include "small_models.h"
#include "test_util.h"

using namespace pgolf;
using test::error_of;
using ::testing::HasSubstr;

namespace {

struct Case {
  std::string preset;
  std::string compressor;  // "" = the preset's own
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.preset << "/" << (c.compressor.empty() ? "own" : c.compressor); }

Artifact small_artifact(const std::string& preset, const std::string& compressor, TensorMap* params_out = nullptr) {
  Config cfg = test::small_config(preset);
  if (compressor == "brotli-11+shuffle") {
    apply_compressor_spec(cfg, "brotli-11");
    cfg.set("byte_shuffle", true);
  } else if (!compressor.empty()) {
    apply_compressor_spec(cfg, compressor);
  }
  TensorMap params = stand_in_parameters(cfg, 0.1, 42);
  const TensorMap h = test::random_hessians(params, cfg.get_int("passthrough_max_numel"), 7);
  if (params_out) *params_out = params;
  return build_artifact(cfg, params, &h);
}

class ArtifactRoundTrip : public ::testing::TestWithParam<Case> {};

TEST_P(ArtifactRoundTrip, UnpackGivesTheDequantizedTensorsExactly) {
  TensorMap params;
  const Artifact a = small_artifact(GetParam().preset, GetParam().compressor, &params);
  ArtifactSizes sizes;
  const auto bytes = serialize_artifact(a, &sizes);
  EXPECT_EQ(sizes.file_bytes, bytes.size());
  ArtifactSizes read_sizes;
  const Artifact b = parse_artifact(bytes, "round trip", &read_sizes);
  EXPECT_EQ(read_sizes.payload_bytes, sizes.payload_bytes);
  EXPECT_EQ(read_sizes.codes_bytes, sizes.codes_bytes);
  EXPECT_EQ(read_sizes.scales_bytes, sizes.scales_bytes);
  EXPECT_EQ(read_sizes.passthrough_bytes, sizes.passthrough_bytes);
  EXPECT_EQ(b.preset, a.preset);
  EXPECT_EQ(b.scheme, a.scheme);
  EXPECT_EQ(b.config_toml, a.config_toml);
  EXPECT_EQ(b.compression.name(), a.compression.name());
  EXPECT_EQ(b.bank_layers, a.bank_layers);
  ASSERT_EQ(b.model.tensors.size(), a.model.tensors.size());
  int quantized = 0;
  for (size_t i = 0; i < a.model.tensors.size(); ++i) {
    const auto &x = a.model.tensors[i], &y = b.model.tensors[i];
    SCOPED_TRACE(x.plan.name);
    EXPECT_EQ(y.plan.name, x.plan.name);
    EXPECT_EQ(y.plan.label, x.plan.label);
    EXPECT_EQ(y.plan.method, x.plan.method);
    EXPECT_EQ(y.plan.category, x.plan.category);
    EXPECT_EQ(y.plan.shape, x.plan.shape);
    EXPECT_EQ(y.plan.dtype, x.plan.dtype);
    EXPECT_EQ(y.plan.packed, x.plan.packed);
    EXPECT_EQ(y.codes, x.codes);
    EXPECT_EQ(y.scale.bytes, x.scale.bytes);
    EXPECT_EQ(y.passthrough.dtype, x.passthrough.dtype);
    EXPECT_EQ(y.passthrough.bytes, x.passthrough.bytes);
    quantized += x.plan.method != QuantMethod::Passthrough;
  }
  EXPECT_GT(quantized, 10);
  // Unpacked weights: the checkpoint's names, order and shapes; values = the dequantized tensors.
  const TensorMap w = artifact_weights(b);
  EXPECT_EQ(w.names(), params.names());
  TensorMap expected = dequantize_model(a.model);
  if (a.bank_layers > 0) expected = rebank(expected, a.bank_layers);
  for (const auto& n : params.names()) {
    EXPECT_EQ(w.get(n).shape, params.get(n).shape) << n;
    EXPECT_EQ(w.get(n).dtype, DType::F32) << n;
    EXPECT_EQ(w.get(n).bytes, expected.get(n).bytes) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Schemes, ArtifactRoundTrip,
    ::testing::Values(Case{"baseline", ""}, Case{"s691", ""}, Case{"s562", ""}, Case{"s600", ""}, Case{"s1560", ""}));
INSTANTIATE_TEST_SUITE_P(Compressors, ArtifactRoundTrip,
                         ::testing::Values(Case{"s691", "none"}, Case{"s691", "zlib-9"}, Case{"s691", "zstd-22"},
                                           Case{"s691", "lzma-6"}, Case{"s691", "lzma-9e"},
                                           Case{"s691", "brotli-11"}, Case{"s691", "brotli-11+shuffle"}));

TEST(Artifact, PresetsUseTheirReferenceCompressors) {
  EXPECT_EQ(small_artifact("baseline", "").compression.name(), "zlib-9");
  EXPECT_EQ(small_artifact("s691", "").compression.name(), "zstd-22");
  EXPECT_EQ(small_artifact("s1560", "").compression.name(), "brotli-11+shuffle2");
  const Artifact s562 = small_artifact("s562", "");
  EXPECT_FALSE(s562.model.pruned.empty());  // pruning records travel in the header
  const auto b = parse_artifact(serialize_artifact(s562), "s562");
  ASSERT_EQ(b.model.pruned.size(), s562.model.pruned.size());
  EXPECT_EQ(b.model.pruned[0].threshold, s562.model.pruned[0].threshold);
}

class ArtifactCorruption : public ::testing::Test {
 protected:
  void SetUp() override { good_ = serialize_artifact(small_artifact("s691", "zstd-3")); }
  std::string parse_error(std::vector<uint8_t> bytes) {
    return error_of([&] { parse_artifact(bytes, "art.bin"); });
  }
  static void reseal(std::vector<uint8_t>& b) {  // recompute the file checksum after an edit
    const uint32_t crc = static_cast<uint32_t>(crc32(0L, b.data(), static_cast<uInt>(b.size() - 4)));
    std::memcpy(b.data() + b.size() - 4, &crc, 4);
  }
  std::vector<uint8_t> good_;
};

TEST_F(ArtifactCorruption, TruncatedFilesAreRefused) {
  for (size_t keep : {size_t{0}, size_t{10}, size_t{43}, good_.size() / 2, good_.size() - 1}) {
    auto b = good_;
    b.resize(keep);
    EXPECT_THAT(parse_error(b), HasSubstr("truncated")) << keep;
  }
  auto longer = good_;
  longer.push_back(0);
  EXPECT_THAT(parse_error(longer), HasSubstr("truncated or padded"));
}

TEST_F(ArtifactCorruption, FlippedBytesFailTheChecksums) {
  for (size_t at : {size_t{45}, good_.size() / 2, good_.size() - 5, good_.size() - 1}) {
    auto b = good_;
    b[at] ^= 0x10;
    EXPECT_THAT(parse_error(b), HasSubstr("damaged artifact: file checksum")) << at;
  }
  auto b = good_;
  b[29] ^= 0x01;  // the stored payload checksum, with the file checksum made consistent again
  reseal(b);
  EXPECT_THAT(parse_error(b), HasSubstr("payload checksum"));
  auto c = good_;
  c[good_.size() / 2] ^= 0xff;  // compressed stream damaged behind a consistent file checksum
  reseal(c);
  EXPECT_THAT(parse_error(c), HasSubstr("art.bin"));
}

TEST_F(ArtifactCorruption, WrongMagicOrVersionIsRefused) {
  auto b = good_;
  b[0] = 'X';
  EXPECT_THAT(parse_error(b), HasSubstr("not a pgolf artifact"));
  auto v = good_;
  const uint32_t version = 2;
  std::memcpy(v.data() + 8, &version, 4);
  EXPECT_THAT(parse_error(v), HasSubstr("format version 2, this pgolf reads version 1"));
  auto c = good_;
  c[12] = 9;  // compressor id
  reseal(c);
  EXPECT_THAT(parse_error(c), HasSubstr("unknown compressor id 9"));
}

TEST(Artifact, WrittenAtomicallyAndRecognizedByMagic) {
  test::TempDir dir;
  const Artifact a = small_artifact("s600", "zstd-3");
  const size_t n = write_artifact(dir / "a.pgolf", a);
  EXPECT_EQ(n, std::filesystem::file_size(dir / "a.pgolf"));
  EXPECT_TRUE(is_artifact_file(dir / "a.pgolf"));
  const Artifact b = read_artifact(dir / "a.pgolf");
  EXPECT_EQ(b.model.tensors.size(), a.model.tensors.size());
  save_safetensors(dir / "x.safetensors", TensorMap{});
  EXPECT_FALSE(is_artifact_file(dir / "x.safetensors"));
  EXPECT_THAT(error_of([&] { read_artifact(dir / "missing.pgolf"); }), HasSubstr("missing.pgolf"));
}

TEST(Compression, EveryCompressorRoundTripsAndChecksSizes) {
  std::vector<uint8_t> data(100000);
  Rng rng(3);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i % 7 == 0 ? rng.below(256) : i % 13);
  for (const char* spec : {"none", "zlib-9", "zstd-22", "lzma-6", "lzma-9e", "brotli-11"}) {
    Config c = Config::load("baseline");
    apply_compressor_spec(c, spec);
    for (bool shuffle : {false, true}) {
      c.set("byte_shuffle", shuffle);
      const auto s = CompressionSpec::from_config(c);
      const auto z = compress_bytes(data, s);
      if (s.kind != Compressor::None) {
        EXPECT_LT(z.size(), data.size() / 2) << s.name();
      }
      EXPECT_EQ(decompress_bytes(z, s, data.size(), "t"), data) << s.name();
      EXPECT_THROW(decompress_bytes(z, s, data.size() + 1, "t"), Error) << s.name();
    }
  }
}

TEST(Compression, ByteShuffleAndSpecParsing) {
  const std::vector<uint8_t> d = {0, 1, 2, 3, 4};
  EXPECT_EQ(byte_shuffle(d, 2), (std::vector<uint8_t>{0, 2, 4, 1, 3}));
  EXPECT_EQ(byte_unshuffle(byte_shuffle(d, 2), 2), d);
  EXPECT_EQ(byte_unshuffle(byte_shuffle(d, 3), 3), d);
  Config c = Config::load("baseline");
  apply_compressor_spec(c, "lzma-9e");
  EXPECT_EQ(CompressionSpec::from_config(c).name(), "lzma-9e");
  apply_compressor_spec(c, "zstd-22");
  EXPECT_EQ(CompressionSpec::from_config(c).name(), "zstd-22");
  EXPECT_THROW(apply_compressor_spec(c, "gzip-9"), Error);
  EXPECT_THROW(apply_compressor_spec(c, "zstd-x"), Error);
  apply_compressor_spec(c, "zstd-23");
  EXPECT_THAT(error_of([&] { CompressionSpec::from_config(c); }), HasSubstr("zstd level 23"));
  apply_compressor_spec(c, "zlib-9e");
  EXPECT_THAT(error_of([&] { CompressionSpec::from_config(c); }), HasSubstr("only for lzma"));
}

TEST(Pack, SelectsTheModelParametersAndNamesWhatIsMissing) {
  Config cfg = test::small_config("s691");
  TensorMap ck = stand_in_parameters(cfg, 0.1, 1);
  ck.set("optimizer/step", HostTensor::from<int64_t>({}, std::vector<int64_t>{5}));
  const TensorMap p = select_parameters(cfg, ck, "ck.safetensors");
  EXPECT_EQ(p.size(), ck.size() - 1);
  EXPECT_FALSE(p.has("optimizer/step"));
  TensorMap missing;
  for (const auto& n : ck.names())
    if (n != "blocks.2.mlp.fc.weight") missing.set(n, ck.get(n));
  EXPECT_THAT(error_of([&] { select_parameters(cfg, missing, "ck.safetensors"); }),
              HasSubstr("ck.safetensors: parameter 'blocks.2.mlp.fc.weight' of preset s691 is missing"));
  Config s1560 = test::small_config("s1560");
  EXPECT_THAT(error_of([&] { build_artifact(s1560, stand_in_parameters(s1560, 0.1, 1), nullptr); }),
              HasSubstr("gptq_full needs Hessians"));
}

}  // namespace
