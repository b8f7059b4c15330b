#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/bpb.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "test_util.h"

using namespace pgolf;

namespace {

const Tokenizer& sp1024() {
  static Tokenizer tok(test::sp1024_model());
  return tok;
}

TargetBytes val_prefix_counts(int64_t seq_len) {
  const ByteTables tables = sp1024().byte_tables();
  std::vector<uint16_t> tokens = load_validation_tokens({test::val_prefix_shard()}, seq_len, 1024);
  return count_stream_bytes<uint16_t>(tables, tokens);
}

}  // namespace

TEST(ByteTables, FollowTheModelsPieceKinds) {
  const Tokenizer& tok = sp1024();
  EXPECT_EQ(tok.vocab_size(), 1024);
  EXPECT_EQ(tok.bos_id(), 1);
  const ByteTables t = tok.byte_tables();
  ASSERT_EQ(t.size(), 1024);
  int boundaries = 0, byte_pieces = 0, spaced = 0;
  for (int id = 0; id < 1024; ++id) {
    const std::string& p = tok.piece(id);
    if (t.is_boundary[id]) {
      ++boundaries;
      EXPECT_EQ(t.base_bytes[id], 0) << p;
      EXPECT_TRUE(tok.is_control(id) || p == "<unk>") << p;
    } else if (tok.is_byte(id)) {
      ++byte_pieces;
      EXPECT_EQ(t.base_bytes[id], 1) << p;
      EXPECT_EQ(p.rfind("<0x", 0), 0u) << p;
    } else if (t.has_leading_space[id]) {
      ++spaced;
      EXPECT_EQ(p.rfind("\xE2\x96\x81", 0), 0u) << p;
      EXPECT_EQ(t.base_bytes[id], static_cast<int32_t>(p.size()) - 3) << p;
    } else {
      EXPECT_EQ(t.base_bytes[id], static_cast<int32_t>(p.size())) << p;
    }
  }
  // pad, bos, eos, unk; the 256 byte-fallback pieces; merges, many of them word starts.
  EXPECT_EQ(boundaries, 4);
  EXPECT_EQ(byte_pieces, 256);
  EXPECT_GT(spaced, 100);
}

TEST(ByteTables, PaddedToTheModelVocabulary) {
  const ByteTables t = sp1024().byte_tables(1100);
  ASSERT_EQ(t.size(), 1100);
  for (int id = 1024; id < 1100; ++id) {
    EXPECT_EQ(t.base_bytes[id], 0);
    EXPECT_EQ(t.has_leading_space[id], 0);
    EXPECT_EQ(t.is_boundary[id], 1);
  }
}

TEST(ByteTables, LeadingSpaceCountsUnlessAfterBoundary) {
  const Tokenizer& tok = sp1024();
  const ByteTables t = tok.byte_tables();
  std::vector<int> ids = tok.encode("of the");  // "o", "f", "▁the": the space inside the text becomes '▁'
  ASSERT_EQ(ids.size(), 3u);
  const int id = ids[2];
  ASSERT_EQ(tok.piece(id), "\xE2\x96\x81the");
  EXPECT_EQ(t.bytes(tok.bos_id(), id), 3);  // after BOS the '▁' is not a byte
  EXPECT_EQ(t.bytes(id, id), 4);            // after a normal piece it is the space
  EXPECT_EQ(t.bytes(id, tok.bos_id()), 0);  // a BOS target is worth 0 bytes
}

TEST(Bpb, ValidationPrefixCheckValues) {
  // ENGINEERING §3 / data/README.md: exact counts with the official sp1024 tables.
  TargetBytes all = val_prefix_counts(0);
  EXPECT_EQ(all.targets, 1040297);
  EXPECT_EQ(all.bytes, 2504867);
  TargetBytes t1024 = val_prefix_counts(1024);
  EXPECT_EQ(t1024.targets, 1039360);
  EXPECT_EQ(t1024.bytes, 2502627);
  TargetBytes t2048 = val_prefix_counts(2048);
  EXPECT_EQ(t2048.targets, 1038336);
  EXPECT_EQ(t2048.bytes, 2500116);
  TargetBytes t4096 = val_prefix_counts(4096);
  EXPECT_EQ(t4096.targets, 1036288);
  EXPECT_EQ(t4096.bytes, 2495207);
}

TEST(Bpb, UsableTargets) {
  EXPECT_EQ(usable_targets(1040298, 1024), 1039360);
  EXPECT_EQ(usable_targets(1025, 1024), 1024);
  EXPECT_EQ(usable_targets(1024, 1024), 0);
  EXPECT_EQ(usable_targets(0, 1024), 0);
}

TEST(Bpb, ValidationTokensConcatenateSortedShardsAndTruncate) {
  test::TempDir dir;
  // Given out of order: the stream is b_0 then b_1.
  write_shard(dir / "v_000001.bin", std::vector<uint16_t>{7, 8, 9, 10});
  write_shard(dir / "v_000000.bin", std::vector<uint16_t>{1, 2, 3, 4, 5, 6});
  auto tokens = load_validation_tokens({dir / "v_000001.bin", dir / "v_000000.bin"}, 4);
  // 10 tokens -> floor(9 / 4) * 4 = 8 targets -> 9 tokens.
  EXPECT_EQ(tokens, (std::vector<uint16_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}));
  auto all = load_validation_tokens({dir / "v_000000.bin", dir / "v_000001.bin"}, 0);
  EXPECT_EQ(all.size(), 10u);
  EXPECT_THROW(load_validation_tokens({dir / "v_000000.bin"}, 16), Error);
  EXPECT_THROW(load_validation_tokens({dir / "v_000000.bin"}, 0, 5), Error);  // id 5 >= vocab 5
}

TEST(Bpb, AccumulatorFollowsTheReferenceFormula) {
  BpbAccumulator a, b;
  a.add(100.0, 40.0, 90.0);
  b.add(60.0, 24.0, 70.0);
  a.add(b);
  EXPECT_DOUBLE_EQ(a.loss_sum, 160.0);
  EXPECT_DOUBLE_EQ(a.tokens, 64.0);
  EXPECT_DOUBLE_EQ(a.bytes, 160.0);
  EXPECT_DOUBLE_EQ(a.val_loss(), 2.5);
  // bpb = loss_sum / (ln 2 * bytes) = 160 / (ln 2 * 160) = 1 / ln 2
  EXPECT_NEAR(a.val_bpb(), 1.0 / std::log(2.0), 1e-15);
  EXPECT_THROW(BpbAccumulator{}.val_loss(), Error);
}

TEST(InspectCommand, ReportsTargetsAndBytesOfTheValidationPrefix) {
  for (auto [seq_len, targets, bytes] : {std::tuple{1024, 1039360, 2502627}, std::tuple{2048, 1038336, 2500116}}) {
    auto r = test::run_pgolf("inspect " + test::val_prefix_shard().string() + " --tokenizer " +
                             test::sp1024_model().string() + " --seq-len " + std::to_string(seq_len) + " --json");
    ASSERT_EQ(r.status, 0) << r.output;
    auto j = nlohmann::json::parse(r.output);
    EXPECT_EQ(j["tokens"], 1040298);
    EXPECT_EQ(j["docs"], 902);  // 901 whole documents and the start of the 902nd
    EXPECT_EQ(j["targets"], targets);
    EXPECT_EQ(j["bytes"], bytes);
    EXPECT_EQ(j["targets_all"], 1040297);
    EXPECT_EQ(j["bytes_all"], 2504867);
  }
}

TEST(InspectCommand, RejectsShardWithIdsBeyondTheTokenizer) {
  test::TempDir dir;
  write_shard(dir / "bad.bin", std::vector<uint16_t>{1, 20, 4000});
  auto r = test::run_pgolf("inspect " + (dir / "bad.bin").string() + " --tokenizer " + test::sp1024_model().string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("token 2 has id 4000"), std::string::npos) << r.output;
}
