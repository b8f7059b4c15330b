#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zstd.h>

#include "core/error.h"
#include "data/text_reader.h"
#include "test_util.h"

using namespace pgolf;
using ::testing::HasSubstr;

namespace {

std::vector<std::string> read_all(const std::filesystem::path& p) {
  TextReader r(p);
  std::vector<std::string> docs;
  std::string t;
  while (r.next(t)) docs.push_back(t);
  return docs;
}

std::string error_reading(const std::filesystem::path& p) {
  try {
    read_all(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// zstd frame of `text`; `window_log` > 0 forces that window size in the frame header.
std::vector<uint8_t> zstd_compress(const std::string& text, int window_log = 0) {
  ZSTD_CCtx* c = ZSTD_createCCtx();
  if (window_log > 0) {
    ZSTD_CCtx_setParameter(c, ZSTD_c_windowLog, window_log);
    ZSTD_CCtx_setParameter(c, ZSTD_c_enableLongDistanceMatching, 1);
  }
  std::vector<uint8_t> out(ZSTD_compressBound(text.size()) + 1024);
  ZSTD_outBuffer o{out.data(), out.size(), 0};
  ZSTD_inBuffer in{text.data(), text.size(), 0};
  // Two calls, so the size is not known up front and the window is not shrunk to fit it.
  ZSTD_compressStream2(c, &o, &in, ZSTD_e_continue);
  while (ZSTD_compressStream2(c, &o, &in, ZSTD_e_end) != 0) {
  }
  ZSTD_freeCCtx(c);
  out.resize(o.pos);
  return out;
}

const std::string kJsonl =
    "{\"id\": 1, \"text\": \"first doc\\nwith two lines\", \"title\": \"x\"}\n"
    "\n"
    "  \r\n"
    "{\"text\": \"caf\\u00e9 \\ud83d\\ude00\"}\r\n"
    "{\"meta\": {\"a\": [1,2]}, \"text\": \"\"}\n"
    "{\"text\": \"last, no newline\"}";

}  // namespace

TEST(TextReader, JsonlDocumentsSkipBlankLinesAndIgnoreOtherKeys) {
  test::TempDir dir;
  write_text_file_atomic(dir / "a.jsonl", kJsonl);
  auto docs = read_all(dir / "a.jsonl");
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0], "first doc\nwith two lines");
  EXPECT_EQ(docs[1], "caf\xC3\xA9 \xF0\x9F\x98\x80");
  EXPECT_EQ(docs[2], "");
  EXPECT_EQ(docs[3], "last, no newline");
  EXPECT_EQ(count_documents(dir / "a.jsonl"), 4);
}

TEST(TextReader, ZstdJsonlGivesTheSameDocuments) {
  test::TempDir dir;
  write_text_file_atomic(dir / "a.jsonl", kJsonl);
  write_file_atomic(dir / "a.jsonl.zst", zstd_compress(kJsonl));
  EXPECT_EQ(read_all(dir / "a.jsonl.zst"), read_all(dir / "a.jsonl"));
  EXPECT_EQ(count_documents(dir / "a.jsonl.zst"), 4);
}

TEST(TextReader, LongLinesAcrossReadChunks) {
  // Lines longer than the reader's 1 MiB chunk, compressed with a 2^27 window (as the shared data).
  test::TempDir dir;
  std::string a(3 << 20, 'a'), b(1500000, 'b');
  std::string jsonl = "{\"text\": \"" + a + "\"}\n{\"text\": \"" + b + "\"}\n";
  write_file_atomic(dir / "long.jsonl.zst", zstd_compress(jsonl, 27));
  auto docs = read_all(dir / "long.jsonl.zst");
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], a);
  EXPECT_EQ(docs[1], b);
}

TEST(TextReader, ReadsTheSharedCompressedCorpus) {
  // The first documents of the IMDB set: JSON objects with "split", "file" and "text".
  TextReader r(test::data_dir() / "text" / "imdb_aclImdb_100k_reviews.jsonl.zst");
  std::string t;
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(r.next(t));
    EXPECT_FALSE(t.empty());
  }
  EXPECT_EQ(r.line(), 100);
}

TEST(TextReader, PlainTextFileIsOneDocument) {
  test::TempDir dir;
  const std::string text = "line one\n\nline three\n";
  write_text_file_atomic(dir / "doc.txt", text);
  EXPECT_EQ(read_all(dir / "doc.txt"), std::vector<std::string>{text});
  write_file_atomic(dir / "doc.txt.zst", zstd_compress(text));
  EXPECT_EQ(read_all(dir / "doc.txt.zst"), std::vector<std::string>{text});
  EXPECT_EQ(count_documents(dir / "doc.txt"), 1);
}

TEST(TextReader, BadJsonLineNamesFileAndLine) {
  test::TempDir dir;
  write_text_file_atomic(dir / "bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"unterminated}\n");
  std::string msg = error_reading(dir / "bad.jsonl");
  EXPECT_THAT(msg, HasSubstr((dir / "bad.jsonl").string() + ":3"));
  EXPECT_THAT(msg, HasSubstr("not a JSON line"));
}

TEST(TextReader, MissingOrNonStringTextNamesFileAndLine) {
  test::TempDir dir;
  write_text_file_atomic(dir / "notext.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  EXPECT_THAT(error_reading(dir / "notext.jsonl"), HasSubstr("notext.jsonl:2: expected a \"text\" string, got no"));
  write_text_file_atomic(dir / "number.jsonl", "{\"text\": 5}\n");
  EXPECT_THAT(error_reading(dir / "number.jsonl"), HasSubstr("number.jsonl:1: expected a \"text\" string, got a number"));
  write_text_file_atomic(dir / "array.jsonl", "[1, 2]\n");
  EXPECT_THAT(error_reading(dir / "array.jsonl"), HasSubstr("array.jsonl:1: expected a JSON object"));
}

TEST(TextReader, TruncatedZstdIsAnError) {
  test::TempDir dir;
  std::string jsonl;
  for (int i = 0; i < 2000; ++i) jsonl += "{\"text\": \"document number " + std::to_string(i) + "\"}\n";
  auto z = zstd_compress(jsonl);
  z.resize(z.size() / 2);
  write_file_atomic(dir / "cut.jsonl.zst", z);
  EXPECT_THAT(error_reading(dir / "cut.jsonl.zst"), HasSubstr("cut.jsonl.zst"));
}

TEST(TextReader, WindowAboveTheLimitIsAnError) {
  test::TempDir dir;
  std::string jsonl;
  for (int i = 0; i < 1000; ++i) jsonl += "{\"text\": \"doc " + std::to_string(i) + "\"}\n";
  write_file_atomic(dir / "wide.jsonl.zst", zstd_compress(jsonl, 28));
  std::string msg = error_reading(dir / "wide.jsonl.zst");
  EXPECT_THAT(msg, HasSubstr("wide.jsonl.zst"));
  EXPECT_THAT(msg, HasSubstr("2^27"));
}

TEST(TextReader, StripWhitespaceMatchesPythonStrip) {
  EXPECT_EQ(strip_whitespace("  a b \t\n"), "a b");
  EXPECT_EQ(strip_whitespace("\xC2\xA0x\xE3\x80\x80"), "x");  // U+00A0 ... U+3000
  EXPECT_EQ(strip_whitespace("\xE2\x80\x83y\xE2\x80\xA8"), "y");  // U+2003 ... U+2028
  EXPECT_EQ(strip_whitespace("\x1c\x1fz\x0b"), "z");
  EXPECT_EQ(strip_whitespace("\xE2\x80\x8Bw"), "\xE2\x80\x8Bw");  // U+200B is not whitespace for Python
  EXPECT_EQ(strip_whitespace("\xC3\xA9"), "\xC3\xA9");
  EXPECT_EQ(strip_whitespace(" \n "), "");
  EXPECT_EQ(strip_whitespace(""), "");
}
