#include "core/source_strip.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace pgolf {
namespace {

std::string strip(std::string_view text) { return strip_cpp_source(text, "t.cpp"); }

TEST(SourceStrip, RemovesCommentsIndentationAndEmptyLines) {
  const std::string in =
      "// header comment\n"
      "#include <vector>  // trailing\n"
      "\n"
      "namespace x {\n"
      "    int f(int a,   int b) {  /* sum */\n"
      "      return a +  b;  \n"
      "    }\n"
      "/* spans\n"
      "   lines */ int g;\n"
      "}  // namespace x\n";
  EXPECT_EQ(strip(in),
            "#include <vector>\n"
            "namespace x {\n"
            "int f(int a, int b) {\n"
            "return a + b;\n"
            "}\n"
            "int g;\n"
            "}\n");
}

TEST(SourceStrip, ABlockCommentBetweenTokensBecomesASpace) {
  EXPECT_EQ(strip("int a/**/b;"), "int a b;\n");
  EXPECT_EQ(strip("x = 1/*c*/+2;"), "x = 1 +2;\n");
}

TEST(SourceStrip, KeepsLiteralsExactly) {
  EXPECT_EQ(strip("const char* s = \"a // b /* c */  d\";\n"), "const char* s = \"a // b /* c */  d\";\n");
  EXPECT_EQ(strip("auto e = \"say \\\"hi\\\" // x\"; // gone\n"), "auto e = \"say \\\"hi\\\" // x\";\n");
  EXPECT_EQ(strip("char q = '\"'; char a = '\\''; char s = '/';  // c\n"),
            "char q = '\"'; char a = '\\''; char s = '/';\n");
  EXPECT_EQ(strip("auto w = L\"  x  \"; auto u = u8\"//\";\n"), "auto w = L\"  x  \"; auto u = u8\"//\";\n");
}

TEST(SourceStrip, KeepsRawStringsAcrossLines) {
  const std::string in =
      "  auto r = R\"(line one // not a comment\n"
      "    indented \"quoted\"\n"
      ")\";  // comment\n"
      "  auto d = R\"x(a )\" b)x\";\n";
  EXPECT_EQ(strip(in),
            "auto r = R\"(line one // not a comment\n"
            "    indented \"quoted\"\n"
            ")\";\n"
            "auto d = R\"x(a )\" b)x\";\n");
}

TEST(SourceStrip, DigitSeparatorsAreNotCharacterLiterals) {
  EXPECT_EQ(strip("int n = 1'000'000;  // big\nint h = 0xff'ff; char c = 'x';\n"),
            "int n = 1'000'000;\nint h = 0xff'ff; char c = 'x';\n");
}

TEST(SourceStrip, KeepsABlankBeforeTheContinuationOfABackslashLine) {
  EXPECT_EQ(strip("#define M(x) \\\n    do {    \\\n      f(x); \\\n    } while (0)\nint y;\n"),
            "#define M(x) \\\n do { \\\n f(x); \\\n } while (0)\nint y;\n");
  // Without the blank the splice would glue "foo" and "bar" into one token.
  EXPECT_EQ(strip("#define N foo\\\n    bar\n"), "#define N foo\\\n bar\n");
  // An empty line ends a continued directive, so it stays.
  EXPECT_EQ(strip("#define E 1 \\\n\nint z;\n"), "#define E 1 \\\n\nint z;\n");
}

TEST(SourceStrip, RefusesWhatItCannotStripSafely) {
  EXPECT_THROW(strip("const char* s = \"open\n"), std::runtime_error);
  EXPECT_THROW(strip("char c = 'x;\n"), std::runtime_error);
  EXPECT_THROW(strip("int a; /* never closed\n"), std::runtime_error);
  EXPECT_THROW(strip("int a; // continued \\\nint b;\n"), std::runtime_error);
  EXPECT_THROW(strip("auto r = R\"(never closed\n"), std::runtime_error);
  try {
    strip_cpp_source("\"x\n", "src/a.cpp");
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("src/a.cpp"), std::string::npos) << e.what();
  }
}

TEST(SourceStrip, HashCommentFilesLoseCommentLinesOnly) {
  EXPECT_EQ(strip_hash_comment_lines("# comment\nkey = \"a # b\"  # note\n\n  # indented\nx = 1"),
            "key = \"a # b\"  # note\nx = 1\n");
  EXPECT_EQ(source_kind("src/a/b.cu"), SourceKind::cpp);
  EXPECT_EQ(source_kind("src/a/b.cuh"), SourceKind::cpp);
  EXPECT_EQ(source_kind("CMakeLists.txt"), SourceKind::hash_comments);
  EXPECT_EQ(source_kind("configs/s691.toml"), SourceKind::hash_comments);
  EXPECT_EQ(source_kind("scripts/setup.sh"), SourceKind::verbatim);
  EXPECT_EQ(source_kind("CMakePresets.json"), SourceKind::verbatim);
  EXPECT_EQ(strip_source("#!/bin/sh\n# kept\n", "scripts/setup.sh"), "#!/bin/sh\n# kept\n");
}

// Every C++/CUDA source of the project strips without error, shrinks, and stripping is idempotent
// (a second pass finds nothing left to remove).
TEST(SourceStrip, TheProjectSourcesStripIdempotently) {
  namespace fs = std::filesystem;
  int files = 0;
  std::size_t before = 0, after = 0;
  for (const auto& entry : fs::recursive_directory_iterator(fs::path(PGOLF_SOURCE_DIR) / "src")) {
    if (!entry.is_regular_file()) continue;
    const std::string name = entry.path().string();
    if (source_kind(name) != SourceKind::cpp) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    const std::string once = strip_cpp_source(text, name);
    EXPECT_EQ(strip_cpp_source(once, name), once) << name;
    EXPECT_LE(once.size(), text.size()) << name;
    before += text.size();
    after += once.size();
    ++files;
  }
  EXPECT_GT(files, 100);
  EXPECT_LT(after, before);
}

}  // namespace
}  // namespace pgolf
