// Streaming document readers for the text that `pgolf prepare` and `pgolf tokenizer train` consume:
//   *.jsonl            one JSON object per line; its "text" string is the document (other keys ignored)
//   *.jsonl.zst        the same, zstd-compressed (windows up to 2^27 bytes, as `zstd --long=27`)
//   anything else      plain UTF-8 text, the whole file is one document (*.zst: compressed)
// Blank JSONL lines are skipped. A line that is not a JSON object with a string "text" is an error
// naming file:line.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "core/fs.h"

namespace pgolf {

enum class TextFormat { Jsonl, PlainText };

// The format of `path`, from its name (see above).
TextFormat text_format_of(const fs::path& path);

// A sequential source of decompressed bytes (a plain file or a zstd stream).
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Reads up to `n` bytes into `dst`; returns 0 only at the end of the data.
  virtual size_t read(char* dst, size_t n) = 0;
  // Bytes consumed from the file on disk so far (compressed bytes for .zst), for progress reports.
  virtual uint64_t file_bytes_read() const = 0;
};

// Opens `path`, decompressing when its name ends in .zst.
std::unique_ptr<ByteSource> open_byte_source(const fs::path& path);

class TextReader {
 public:
  explicit TextReader(const fs::path& path);
  ~TextReader();
  TextReader(const TextReader&) = delete;
  TextReader& operator=(const TextReader&) = delete;

  // Reads the next document into `text`; false at the end of the file.
  bool next(std::string& text);

  const fs::path& path() const { return path_; }
  int64_t line() const { return line_; }  // the 1-based JSONL line of the last document (0 for plain text)
  uint64_t file_bytes_read() const { return source_->file_bytes_read(); }
  uint64_t file_size() const { return file_size_; }

 private:
  bool next_line(std::string_view& line);  // the next line without its '\n' (and '\r'); false at the end

  fs::path path_;
  TextFormat format_;
  uint64_t file_size_ = 0;
  std::unique_ptr<ByteSource> source_;
  std::string buffer_;      // decompressed bytes not yet consumed
  size_t buffer_pos_ = 0;
  bool source_done_ = false;
  bool plain_text_done_ = false;
  int64_t line_ = 0;
};

// Number of documents in `path` (non-blank lines of a JSONL file, 1 for plain text), without parsing JSON.
int64_t count_documents(const fs::path& path);

// `s` without leading and trailing whitespace, where whitespace is what Python's str.isspace() accepts
// (ASCII whitespace, U+001C..U+001F, U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F,
// U+205F, U+3000) — the references clean tokenizer-training text with Python's str.strip().
std::string_view strip_whitespace(std::string_view s);

}  // namespace pgolf
