#include "data/text_reader.h"

#include <fcntl.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"

namespace pgolf {

namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

class FileSource final : public ByteSource {
 public:
  explicit FileSource(const fs::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    PG_CHECK(fd_ >= 0, "cannot open {}: {}", path.string(), std::strerror(errno));
  }
  ~FileSource() override { ::close(fd_); }
  size_t read(char* dst, size_t n) override {
    for (;;) {
      ssize_t r = ::read(fd_, dst, n);
      if (r < 0 && errno == EINTR) continue;
      PG_CHECK(r >= 0, "read of {} failed: {}", path_.string(), std::strerror(errno));
      bytes_ += static_cast<uint64_t>(r);
      return static_cast<size_t>(r);
    }
  }
  uint64_t file_bytes_read() const override { return bytes_; }

 private:
  fs::path path_;
  int fd_ = -1;
  uint64_t bytes_ = 0;
};

// zstd streaming decompression. Frames may be concatenated; the data must end at a frame boundary.
class ZstdSource final : public ByteSource {
 public:
  static constexpr int kWindowLogMax = 27;  // 128 MiB windows, as `zstd --long=27` writes them

  explicit ZstdSource(const fs::path& path) : file_(path), path_(path) {
    dctx_ = ZSTD_createDCtx();
    PG_CHECK(dctx_ != nullptr, "cannot create a zstd decoder for {}", path.string());
    check(ZSTD_DCtx_setParameter(dctx_, ZSTD_d_windowLogMax, kWindowLogMax), "setting the window limit");
    in_buf_.resize(ZSTD_DStreamInSize());
  }
  ~ZstdSource() override { ZSTD_freeDCtx(dctx_); }

  size_t read(char* dst, size_t n) override {
    ZSTD_outBuffer out{dst, n, 0};
    while (out.pos == 0) {
      if (in_.pos == in_.size) {
        size_t got = file_.read(in_buf_.data(), in_buf_.size());
        if (got == 0) {
          PG_CHECK(frame_done_, "{}: the zstd stream ends in the middle of a frame (truncated file)", path_.string());
          return 0;
        }
        in_ = {in_buf_.data(), got, 0};
      }
      size_t ret = ZSTD_decompressStream(dctx_, &out, &in_);
      check(ret, "decompressing");
      frame_done_ = (ret == 0);
    }
    return out.pos;
  }
  uint64_t file_bytes_read() const override { return file_.file_bytes_read(); }

 private:
  void check(size_t ret, const char* what) const {
    PG_CHECK(!ZSTD_isError(ret), "{}: zstd error while {}: {} (windows above 2^{} bytes are not accepted)",
             path_.string(), what, ZSTD_getErrorName(ret), kWindowLogMax);
  }

  FileSource file_;
  fs::path path_;
  ZSTD_DCtx* dctx_ = nullptr;
  std::vector<char> in_buf_;
  ZSTD_inBuffer in_{nullptr, 0, 0};
  bool frame_done_ = true;  // an empty file is an empty stream
};

// Decodes one UTF-8 code point starting at s[i] (no validation beyond the lead byte's length).
char32_t decode_at(std::string_view s, size_t i, size_t& len) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (len == 1 || i + len > s.size()) {
    len = 1;
    return c;
  }
  char32_t cp = c & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

// Only JSON's own whitespace makes a line blank; anything else must parse as a document.
bool is_blank_json_line(std::string_view line) {
  return line.find_first_not_of(" \t\r") == std::string_view::npos;
}

bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace

TextFormat text_format_of(const fs::path& path) {
  const std::string name = path.filename().string();
  return ends_with(name, ".jsonl") || ends_with(name, ".jsonl.zst") ? TextFormat::Jsonl : TextFormat::PlainText;
}

std::unique_ptr<ByteSource> open_byte_source(const fs::path& path) {
  if (ends_with(path.filename().string(), ".zst")) return std::make_unique<ZstdSource>(path);
  return std::make_unique<FileSource>(path);
}

TextReader::TextReader(const fs::path& path)
    : path_(path), format_(text_format_of(path)), source_(open_byte_source(path)) {
  file_size_ = fs::file_size(path);
}

TextReader::~TextReader() = default;

bool TextReader::next_line(std::string_view& line) {
  constexpr size_t kChunk = 1 << 20;
  size_t scanned = buffer_pos_;  // bytes before this offset hold no '\n' of the current line
  for (;;) {
    size_t nl = buffer_.find('\n', scanned);
    if (nl != std::string::npos || source_done_) {
      if (nl == std::string::npos) {
        if (buffer_pos_ == buffer_.size()) return false;
        nl = buffer_.size();  // a last line without '\n'
      }
      line = std::string_view(buffer_).substr(buffer_pos_, nl - buffer_pos_);
      buffer_pos_ = std::min(nl + 1, buffer_.size());
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      ++line_;
      return true;
    }
    // Drop the consumed prefix, then append the next chunk.
    buffer_.erase(0, buffer_pos_);
    buffer_pos_ = 0;
    const size_t old = buffer_.size();
    scanned = old;
    buffer_.resize(old + kChunk);
    const size_t got = source_->read(buffer_.data() + old, kChunk);
    buffer_.resize(old + got);
    source_done_ = (got == 0);
  }
}

bool TextReader::next(std::string& text) {
  if (format_ == TextFormat::PlainText) {
    if (plain_text_done_) return false;
    plain_text_done_ = true;
    text.clear();
    char chunk[1 << 16];
    while (size_t got = source_->read(chunk, sizeof(chunk))) text.append(chunk, got);
    return true;
  }
  std::string_view line;
  while (next_line(line)) {
    if (is_blank_json_line(line)) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail("{}:{}: not a JSON line: {}", path_.string(), line_, e.what());
    }
    PG_CHECK(j.is_object(), "{}:{}: expected a JSON object with a \"text\" string, got a {}", path_.string(), line_,
             j.type_name());
    auto it = j.find("text");
    PG_CHECK(it != j.end() && it->is_string(), "{}:{}: expected a \"text\" string, got {}", path_.string(), line_,
             it == j.end() ? std::string("no \"text\" key") : std::string("a ") + it->type_name());
    text = std::move(it->get_ref<std::string&>());
    return true;
  }
  return false;
}

int64_t count_documents(const fs::path& path) {
  if (text_format_of(path) == TextFormat::PlainText) return 1;
  auto source = open_byte_source(path);
  std::vector<char> chunk(1 << 20);
  int64_t count = 0;
  bool line_has_content = false;  // a byte other than JSON whitespace since the last '\n'
  while (size_t got = source->read(chunk.data(), chunk.size())) {
    size_t start = 0;
    for (size_t nl; start < got; start = nl + 1) {
      const char* p = static_cast<const char*>(std::memchr(chunk.data() + start, '\n', got - start));
      nl = p ? static_cast<size_t>(p - chunk.data()) : got;
      line_has_content |= !is_blank_json_line({chunk.data() + start, nl - start});
      if (p) {
        count += line_has_content;
        line_has_content = false;
      }
    }
  }
  return count + line_has_content;
}

std::string_view strip_whitespace(std::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    size_t len;
    if (!is_python_space(decode_at(s, begin, len))) break;
    begin += len;
  }
  size_t end = s.size();
  while (end > begin) {
    // Step back to the lead byte of the last code point.
    size_t start = end - 1;
    while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80 && end - start < 4) --start;
    size_t len;
    if (!is_python_space(decode_at(s, start, len)) || start + len != end) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

}  // namespace pgolf
