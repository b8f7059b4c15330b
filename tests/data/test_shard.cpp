#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "data/shard.h"
#include "test_util.h"

using namespace pgolf;
using test::error_of;
using ::testing::HasSubstr;

namespace {

std::vector<uint8_t> shard_bytes(int32_t magic, int32_t version, int32_t count, const std::vector<uint16_t>& ids) {
  std::vector<uint8_t> b(1024 + 2 * ids.size(), 0);
  int32_t h[3] = {magic, version, count};
  std::memcpy(b.data(), h, sizeof(h));
  if (!ids.empty()) std::memcpy(b.data() + 1024, ids.data(), 2 * ids.size());
  return b;
}

}  // namespace

TEST(Shard, WriteThenReadIsExact) {
  test::TempDir dir;
  std::vector<uint16_t> ids = {1, 500, 65535, 0, 7};
  write_shard(dir / "a.bin", ids);
  EXPECT_EQ(std::filesystem::file_size(dir / "a.bin"), 1024u + 2 * ids.size());
  // The header is exactly magic, version, count, then 253 zeros.
  auto raw = read_file(dir / "a.bin");
  int32_t header[256];
  std::memcpy(header, raw.data(), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 5);
  for (int i = 3; i < 256; ++i) ASSERT_EQ(header[i], 0) << i;
  Shard s(dir / "a.bin");
  EXPECT_EQ(s.size(), 5);
  EXPECT_EQ(std::vector<uint16_t>(s.tokens().begin(), s.tokens().end()), ids);
  EXPECT_EQ(max_token_id(s.tokens()), 65535);
}

TEST(Shard, EmptyShardIsValid) {
  test::TempDir dir;
  write_shard(dir / "e.bin", std::vector<uint16_t>{});
  Shard s(dir / "e.bin", 1024);
  EXPECT_EQ(s.size(), 0);
}

TEST(Shard, ReadsTheValidationPrefix) {
  Shard s(test::val_prefix_shard(), 1024);
  EXPECT_EQ(s.size(), 1040298);
  EXPECT_EQ(s.tokens()[0], 1);  // the stream starts with a document's BOS
  EXPECT_EQ(max_token_id(s.tokens()), 1023);
}

TEST(Shard, RejectsWrongMagicNamingFileAndValue) {
  test::TempDir dir;
  auto p = dir / "magic.bin";
  write_file_atomic(p, shard_bytes(12345, 1, 2, {1, 2}));
  std::string msg = error_of([&] { Shard s(p); });
  EXPECT_THAT(msg, HasSubstr(p.string()));
  EXPECT_THAT(msg, HasSubstr("magic 12345"));
  EXPECT_THAT(msg, HasSubstr("20240520"));
}

TEST(Shard, RejectsWrongVersion) {
  test::TempDir dir;
  auto p = dir / "version.bin";
  write_file_atomic(p, shard_bytes(20240520, 2, 2, {1, 2}));
  std::string msg = error_of([&] { Shard s(p); });
  EXPECT_THAT(msg, HasSubstr(p.string()));
  EXPECT_THAT(msg, HasSubstr("version 2, expected 1"));
}

TEST(Shard, RejectsTruncatedPayload) {
  test::TempDir dir;
  auto p = dir / "cut.bin";
  auto b = shard_bytes(20240520, 1, 4, {1, 2, 3, 4});
  b.resize(b.size() - 3);  // 1029 bytes where 1032 are expected
  write_file_atomic(p, b);
  std::string msg = error_of([&] { Shard s(p); });
  EXPECT_THAT(msg, HasSubstr(p.string()));
  EXPECT_THAT(msg, HasSubstr("1029 bytes"));
  EXPECT_THAT(msg, HasSubstr("4 tokens"));
  EXPECT_THAT(msg, HasSubstr("1032"));
}

TEST(Shard, RejectsTruncatedHeader) {
  test::TempDir dir;
  auto p = dir / "short.bin";
  write_file_atomic(p, std::vector<uint8_t>(100, 0));
  std::string msg = error_of([&] { Shard s(p); });
  EXPECT_THAT(msg, HasSubstr(p.string()));
  EXPECT_THAT(msg, HasSubstr("100 bytes"));
}

TEST(Shard, RejectsNegativeCount) {
  test::TempDir dir;
  auto p = dir / "neg.bin";
  write_file_atomic(p, shard_bytes(20240520, 1, -3, {}));
  EXPECT_THAT(error_of([&] { Shard s(p); }), HasSubstr("token count -3"));
}

TEST(Shard, RejectsIdAtOrAboveVocab) {
  test::TempDir dir;
  auto p = dir / "ids.bin";
  write_shard(p, std::vector<uint16_t>{1, 5, 1023, 1024, 7, 2000});
  EXPECT_NO_THROW(Shard(p, 2001));
  std::string msg = error_of([&] { Shard s(p, 1024); });
  EXPECT_THAT(msg, HasSubstr(p.string()));
  EXPECT_THAT(msg, HasSubstr("token 3 has id 1024"));  // the first bad position and its id
  EXPECT_THAT(msg, HasSubstr("vocab size 1024"));
  // Without a vocabulary the shard opens; check_ids reports the same later.
  Shard unchecked(p);
  EXPECT_THAT(error_of([&] { unchecked.check_ids(1000); }), HasSubstr("token 2 has id 1023"));
}

TEST(Shard, FindShardsSortsAndFailsWhenNoneMatches) {
  test::TempDir dir;
  write_shard(dir / "x_000001.bin", std::vector<uint16_t>{1});
  write_shard(dir / "x_000000.bin", std::vector<uint16_t>{1});
  auto files = find_shards((dir / "x_*.bin").string());
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].filename(), "x_000000.bin");
  EXPECT_EQ(files[1].filename(), "x_000001.bin");
  EXPECT_THAT(error_of([&] { find_shards((dir / "y_*.bin").string()); }), HasSubstr("no shard matches"));
}
