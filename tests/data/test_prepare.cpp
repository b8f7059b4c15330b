#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "core/error.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/text_reader.h"
#include "test_util.h"

using namespace pgolf;

namespace {

std::filesystem::path val_docs_jsonl() {
  return test::data_dir() / "fineweb_val_prefix" / "fineweb_val_first901docs.jsonl";
}

const Tokenizer& sp1024() {
  static Tokenizer tok(test::sp1024_model());
  return tok;
}

// [BOS] + ids of every document of `path`, computed directly with the tokenizer.
std::vector<std::vector<uint16_t>> encode_documents(const std::filesystem::path& path) {
  std::vector<std::vector<uint16_t>> docs;
  TextReader r(path);
  std::string t;
  while (r.next(t)) {
    std::vector<uint16_t> d{static_cast<uint16_t>(sp1024().bos_id())};
    for (int id : sp1024().encode(t)) d.push_back(static_cast<uint16_t>(id));
    docs.push_back(std::move(d));
  }
  return docs;
}

std::vector<uint16_t> concat_shards(const std::vector<std::filesystem::path>& files) {
  std::vector<uint16_t> all;
  for (auto& f : files) {
    Shard s(f, 1024);
    all.insert(all.end(), s.tokens().begin(), s.tokens().end());
  }
  return all;
}

}  // namespace

TEST(PrepareCommand, ReproducesTheValidationPrefixShard) {
  test::TempDir dir;
  auto r = test::run_pgolf("prepare --tokenizer " + test::sp1024_model().string() + " --out " + dir.path().string() +
                           " --name fineweb_val " + val_docs_jsonl().string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, ::testing::HasSubstr("901 documents, 1,040,060 tokens"));
  Shard ours(dir / "fineweb_val_000000.bin", 1024);
  Shard official(test::val_prefix_shard());
  ASSERT_EQ(ours.size(), 1040060);
  for (int64_t i = 0; i < ours.size(); ++i) ASSERT_EQ(ours.tokens()[i], official.tokens()[i]) << "token " << i;
  EXPECT_FALSE(std::filesystem::exists(dir / "fineweb_val_000001.bin"));
}

TEST(Prepare, DocumentsStraddleShardsInOrderWhateverTheThreadCount) {
  auto docs = encode_documents(val_docs_jsonl());
  std::vector<uint16_t> expected;
  for (auto& d : docs) expected.insert(expected.end(), d.begin(), d.end());
  ASSERT_EQ(expected.size(), 1040060u);
  int64_t text_bytes = 0;
  {
    TextReader r(val_docs_jsonl());
    std::string t;
    while (r.next(t)) text_bytes += static_cast<int64_t>(t.size());
  }

  std::vector<std::vector<uint8_t>> first_run_bytes;
  for (int threads : {1, 2, 5}) {
    test::TempDir dir;
    PrepareOptions o;
    o.inputs = {val_docs_jsonl()};
    o.out_dir = dir.path();
    o.name = "p";
    o.shard_tokens = 100000;
    o.threads = threads;
    PrepareSummary s = prepare_shards(o, sp1024());
    ASSERT_EQ(s.shards.size(), 11u) << threads;  // 10 full shards and 40,060 tokens
    for (size_t i = 0; i < s.shards.size(); ++i) {
      EXPECT_EQ(s.shards[i], dir / shard_file_name("p", false, int64_t(i)));
      EXPECT_EQ(Shard(s.shards[i]).size(), i < 10 ? 100000 : 40060);
    }
    EXPECT_EQ(concat_shards(s.shards), expected) << threads << " threads";
    EXPECT_EQ(s.total.documents, 901);
    EXPECT_EQ(s.total.tokens, 1040060);
    EXPECT_EQ(s.total.text_bytes, text_bytes);
    EXPECT_EQ(s.inputs[0].counts.text_bytes, text_bytes);
    EXPECT_TRUE(s.heldout_shards.empty());
    std::vector<std::vector<uint8_t>> bytes;
    for (auto& f : s.shards) bytes.push_back(read_file(f));
    if (first_run_bytes.empty())
      first_run_bytes = bytes;
    else
      EXPECT_EQ(bytes, first_run_bytes) << threads << " threads";
  }
}

TEST(Prepare, HeldOutDocumentsAreSpreadEvenly) {
  auto docs = encode_documents(val_docs_jsonl());
  test::TempDir dir;
  PrepareOptions o;
  o.inputs = {val_docs_jsonl()};
  o.out_dir = dir.path();
  o.name = "mix";
  o.heldout_docs = 10;  // 901 / 10 -> every 90th document: 0, 90, ..., 810
  PrepareSummary s = prepare_shards(o, sp1024());
  std::vector<uint16_t> held, kept;
  int64_t held_tokens = 0;
  for (size_t g = 0; g < docs.size(); ++g) {
    auto& target = (g % 90 == 0 && g <= 810) ? held : kept;
    target.insert(target.end(), docs[g].begin(), docs[g].end());
    if (g % 90 == 0 && g <= 810) held_tokens += int64_t(docs[g].size());
  }
  ASSERT_EQ(s.heldout_shards.size(), 1u);
  EXPECT_EQ(s.heldout_shards[0], dir / "mix_heldout_000000.bin");
  EXPECT_EQ(concat_shards(s.heldout_shards), held);
  EXPECT_EQ(concat_shards(s.shards), kept);
  EXPECT_EQ(s.total.documents, 901);
  EXPECT_EQ(s.total.heldout_documents, 10);
  EXPECT_EQ(s.total.heldout_tokens, held_tokens);
  EXPECT_EQ(s.total.tokens, 1040060);
}

TEST(Prepare, ShuffledDocumentOrderIsADeterministicPermutation) {
  auto docs = encode_documents(val_docs_jsonl());
  // Splits a stream at its BOS tokens back into documents.
  auto split = [](const std::vector<uint16_t>& stream) {
    std::vector<std::vector<uint16_t>> out;
    for (uint16_t t : stream) {
      if (t == 1) out.emplace_back();
      out.back().push_back(t);
    }
    return out;
  };
  auto run = [&](int64_t seed, int64_t heldout) {
    test::TempDir dir;
    PrepareOptions o;
    o.inputs = {val_docs_jsonl()};
    o.out_dir = dir.path();
    o.shard_tokens = 300000;
    o.shuffle_seed = seed;
    o.heldout_docs = heldout;
    PrepareSummary s = prepare_shards(o, sp1024());
    return std::pair{split(concat_shards(s.shards)), split(concat_shards(s.heldout_shards))};
  };
  auto [a, none] = run(1337, 0);
  ASSERT_EQ(a.size(), docs.size());
  EXPECT_NE(a, docs);
  auto sorted_a = a, sorted_docs = docs;
  std::sort(sorted_a.begin(), sorted_a.end());
  std::sort(sorted_docs.begin(), sorted_docs.end());
  EXPECT_EQ(sorted_a, sorted_docs);
  EXPECT_EQ(run(1337, 0).first, a);
  EXPECT_NE(run(1338, 0).first, a);
  // Held-out documents are chosen by input position, before shuffling, and kept in input order.
  auto [train, held] = run(1337, 10);
  ASSERT_EQ(held.size(), 10u);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(held[i], docs[90 * i]);
  EXPECT_EQ(train.size(), 891u);
}

TEST(Prepare, SeveralInputsAreCountedSeparatelyAndStaleShardsRemoved) {
  test::TempDir in, out;
  write_text_file_atomic(in / "a.jsonl", "{\"text\": \"alpha beta\"}\n{\"text\": \"gamma\"}\n");
  write_text_file_atomic(in / "b.txt", "a plain text document, 123.");
  // Leftovers of an earlier, longer run with the same name, and an unrelated file.
  write_shard(out / "d_000007.bin", std::vector<uint16_t>{1});
  write_shard(out / "d_heldout_000000.bin", std::vector<uint16_t>{1});
  write_text_file_atomic(out / "d_notes.bin", "keep me");
  PrepareOptions o;
  o.inputs = {in / "a.jsonl", in / "b.txt"};
  o.out_dir = out.path();
  o.name = "d";
  o.shard_tokens = 4;
  PrepareSummary s = prepare_shards(o, sp1024());
  ASSERT_EQ(s.inputs.size(), 2u);
  EXPECT_EQ(s.inputs[0].counts.documents, 2);
  EXPECT_EQ(s.inputs[0].counts.text_bytes, 15);
  EXPECT_EQ(s.inputs[1].counts.documents, 1);
  EXPECT_EQ(s.inputs[1].counts.text_bytes, 27);
  EXPECT_EQ(s.total.tokens, s.inputs[0].counts.tokens + s.inputs[1].counts.tokens);
  const int64_t shards = (s.total.tokens + 3) / 4;
  EXPECT_EQ(static_cast<int64_t>(s.shards.size()), shards);
  EXPECT_FALSE(std::filesystem::exists(out / "d_000007.bin"));
  EXPECT_FALSE(std::filesystem::exists(out / "d_heldout_000000.bin"));
  EXPECT_TRUE(std::filesystem::exists(out / "d_notes.bin"));
  std::vector<uint16_t> expected;
  for (auto* f : {"a.jsonl", "b.txt"})
    for (auto& d : encode_documents(in / f)) expected.insert(expected.end(), d.begin(), d.end());
  EXPECT_EQ(concat_shards(s.shards), expected);
}

TEST(Prepare, BadInputFailsWithFileAndLine) {
  test::TempDir in, out;
  write_text_file_atomic(in / "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n");
  PrepareOptions o;
  o.inputs = {in / "bad.jsonl"};
  o.out_dir = out.path();
  try {
    prepare_shards(o, sp1024());
    FAIL() << "bad input accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("bad.jsonl:3"));
  }
}
