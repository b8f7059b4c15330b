#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/shard.h"
#include "data/text_reader.h"
#include "data/tokenizer.h"
#include "test_util.h"

using namespace pgolf;

namespace {
std::filesystem::path val_docs_jsonl() {
  return test::data_dir() / "fineweb_val_prefix" / "fineweb_val_first901docs.jsonl";
}
}  // namespace

TEST(Tokenizer, ReencodesTheValidationDocumentsExactly) {
  Tokenizer tok(test::sp1024_model());
  Shard shard(test::val_prefix_shard());
  auto expected = shard.tokens();
  TextReader reader(val_docs_jsonl());
  std::string text;
  size_t pos = 0;
  int docs = 0;
  while (reader.next(text)) {
    ASSERT_LT(pos, expected.size());
    ASSERT_EQ(expected[pos], tok.bos_id()) << "document " << docs << " does not start at a BOS";
    ++pos;
    std::vector<int> ids = tok.encode(text);
    ASSERT_LE(pos + ids.size(), expected.size());
    for (size_t k = 0; k < ids.size(); ++k) ASSERT_EQ(ids[k], expected[pos + k]) << "document " << docs << " id " << k;
    pos += ids.size();
    ++docs;
  }
  EXPECT_EQ(docs, 901);
  EXPECT_EQ(pos, 1040060u);
  EXPECT_EQ(expected[pos], tok.bos_id());  // the 902nd document starts right after
}

TEST(Tokenizer, RejectsMissingOrInvalidModel) {
  test::TempDir dir;
  EXPECT_THROW(Tokenizer(dir / "none.model"), Error);
  write_text_file_atomic(dir / "junk.model", "not a model");
  try {
    Tokenizer t(dir / "junk.model");
    FAIL() << "junk accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("junk.model"));
  }
}

// `pgolf tokenizer train` on a few thousand IMDB reviews: the challenge's trainer settings must show
// in the model (byte pieces, special ids, split digits, no dummy prefix).
TEST(TokenizerTrain, CommandAppliesTheChallengeSettings) {
  test::TempDir dir;
  auto input = test::data_dir() / "text" / "imdb_aclImdb_100k_reviews.jsonl.zst";
  auto r = test::run_pgolf("tokenizer train --out " + (dir / "tok").string() +
                           " --vocab-size 512 --max-docs 3000 " + input.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, ::testing::HasSubstr("on 3000 documents"));
  ASSERT_TRUE(std::filesystem::exists(dir / "tok.vocab"));
  Tokenizer tok(dir / "tok.model");
  EXPECT_LE(tok.vocab_size(), 512);
  EXPECT_GT(tok.vocab_size(), 260 + 100);  // specials, 256 bytes, then merges
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.piece(0), "<pad>");
  EXPECT_EQ(tok.piece(1), "<s>");
  EXPECT_EQ(tok.piece(2), "</s>");
  EXPECT_EQ(tok.piece(3), "<unk>");
  int byte_pieces = 0;
  for (int id = 0; id < tok.vocab_size(); ++id) byte_pieces += tok.is_byte(id);
  EXPECT_EQ(byte_pieces, 256);
  EXPECT_EQ(tok.piece(4), "<0x00>");
  // Split digits: every digit its own piece.
  std::vector<int> digits = tok.encode("12345");
  ASSERT_EQ(digits.size(), 5u);
  for (int k = 0; k < 5; ++k) EXPECT_EQ(tok.piece(digits[k]), std::string(1, char('1' + k)));
  // No dummy prefix: a text that starts with a word does not get a leading '▁'.
  EXPECT_NE(tok.piece(tok.encode("the")[0]).rfind("\xE2\x96\x81", 0), 0u);
  // Byte fallback: a character absent from the training text becomes its UTF-8 bytes.
  std::vector<int> rare = tok.encode("\xF0\x9F\xA7\xAA");  // U+1F9EA, an emoji newer than the reviews
  ASSERT_EQ(rare.size(), 4u);
  EXPECT_EQ(tok.piece(rare[0]), "<0xF0>");
  EXPECT_EQ(tok.piece(rare[3]), "<0xAA>");
  // The vocabulary listing has one line per piece.
  std::string vocab = read_text_file(dir / "tok.vocab");
  EXPECT_EQ(std::count(vocab.begin(), vocab.end(), '\n'), tok.vocab_size());
}

TEST(TokenizerTrain, CommandReportsBadInputWithFileAndLine) {
  test::TempDir dir;
  write_text_file_atomic(dir / "bad.jsonl", "{\"text\": \"fine\"}\n{\"text\": oops}\n");
  auto r = test::run_pgolf("tokenizer train --out " + (dir / "tok").string() + " --vocab-size 300 " +
                           (dir / "bad.jsonl").string());
  EXPECT_NE(r.status, 0);
  EXPECT_THAT(r.output, ::testing::HasSubstr("bad.jsonl:2"));
}
