#include <gtest/gtest.h>

#include "core/safetensors.h"
#include "test_util.h"

using namespace pgolf;

TEST(Safetensors, RoundTripIsBitExact) {
  test::TempDir dir;
  TensorMap m;
  std::vector<float> a = {1.5f, -2.25f, 3.0f, 1e-30f, -0.0f, 7.0f};
  std::vector<int8_t> q = {-31, 0, 31, 5};
  m.set("w.weight", HostTensor::from<float>({2, 3}, a));
  m.set("codes", HostTensor::from<int8_t>({4}, q));
  m.set("scalar", HostTensor::from<float>({}, std::vector<float>{0.5f}));
  save_safetensors(dir / "x.safetensors", m, {{"format", "pt"}});
  Metadata meta;
  TensorMap r = load_safetensors(dir / "x.safetensors", &meta);
  ASSERT_EQ(r.names(), m.names());
  for (auto& n : m.names()) {
    EXPECT_EQ(r.get(n).dtype, m.get(n).dtype);
    EXPECT_EQ(r.get(n).shape, m.get(n).shape);
    EXPECT_EQ(r.get(n).bytes, m.get(n).bytes);
  }
  EXPECT_EQ(meta["format"], "pt");
}

TEST(Safetensors, ReadsGoldenFile) {
  auto path = test::golden_dir() / "base.safetensors";
  ASSERT_TRUE(std::filesystem::exists(path)) << path;
  TensorMap t = load_safetensors(path);
  ASSERT_TRUE(t.has("tok_emb.weight"));
  EXPECT_EQ(t.get("tok_emb.weight").shape, (Shape{1024, 64}));
  EXPECT_EQ(t.get("x").dtype, DType::I32);
  EXPECT_EQ(t.get("loss_fp64").dtype, DType::F64);
  EXPECT_EQ(t.get("loss").shape, Shape{});
}

TEST(Safetensors, RejectsCorruptFiles) {
  test::TempDir dir;
  TensorMap m;
  m.set("a", HostTensor::from<float>({4}, std::vector<float>{1, 2, 3, 4}));
  auto bytes = serialize_safetensors(m);
  // Truncated data section.
  std::vector<uint8_t> cut(bytes.begin(), bytes.end() - 4);
  EXPECT_THROW(parse_safetensors(cut, "cut"), Error);
  // Header length beyond the file.
  std::vector<uint8_t> bad = bytes;
  bad[0] = 0xff;
  bad[1] = 0xff;
  EXPECT_THROW(parse_safetensors(bad, "bad"), Error);
  // Too short to hold a header length.
  EXPECT_THROW(parse_safetensors(std::vector<uint8_t>{1, 2, 3}, "short"), Error);
}

TEST(Fs, AtomicWriteReplacesWholeFile) {
  test::TempDir dir;
  auto p = dir / "f.bin";
  write_text_file_atomic(p, "first version");
  write_text_file_atomic(p, "2nd");
  EXPECT_EQ(read_text_file(p), "2nd");
  int leftovers = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path())) leftovers += e.path() != p;
  EXPECT_EQ(leftovers, 0);
}
