#include "core/source_strip.h"

#include <stdexcept>

namespace pgolf {
namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool is_word_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

[[noreturn]] void fail(std::string_view name, std::string_view what) {
  throw std::runtime_error("strip " + std::string(name) + ": " + std::string(what));
}

// The stripped text is built line by line: blanks are held back as one pending space and written
// only before a following character of the same line.
class CppStripper {
 public:
  CppStripper(std::string_view in, std::string_view name) : in_(in), name_(name) {}

  std::string run() {
    while (i_ < in_.size()) {
      const char c = in_[i_];
      if (c == '\n') {
        end_line();
        ++i_;
      } else if (c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v') {
        // Leading blanks go, except before the continuation of a backslash-continued line, where the
        // splice would otherwise glue two tokens together.
        if (!line_empty_ || continued_) pending_space_ = true;
        ++i_;
      } else if (c == '/' && next_is('/')) {
        skip_line_comment();
      } else if (c == '/' && next_is('*')) {
        skip_block_comment();
      } else if (c == '"') {
        copy_string();
      } else if (c == '\'') {
        copy_quote();
      } else {
        emit(c);
        ++i_;
      }
    }
    if (!line_empty_) out_ += '\n';
    return out_;
  }

 private:
  bool next_is(char c) const { return i_ + 1 < in_.size() && in_[i_ + 1] == c; }

  void emit(char c) {
    if (pending_space_ && !line_empty_) out_ += ' ';
    if (pending_space_ && line_empty_ && continued_) out_ += ' ';
    pending_space_ = false;
    out_ += c;
    line_empty_ = false;
  }

  void emit_text(std::string_view text) {
    for (char c : text) {
      if (c == '\n') {  // inside a raw string literal: copied exactly
        out_ += c;
        line_empty_ = false;
        continue;
      }
      emit(c);
    }
  }

  void end_line() {
    pending_space_ = false;
    if (!line_empty_) {
      continued_ = out_.back() == '\\';
      out_ += '\n';
      line_empty_ = true;
    } else if (continued_) {
      // An empty line after a backslash ends the directive: it must stay.
      out_ += '\n';
      continued_ = false;
    }
  }

  void skip_line_comment() {
    std::size_t end = in_.find('\n', i_);
    if (end == std::string_view::npos) end = in_.size();
    std::size_t last = end;
    while (last > i_ && (in_[last - 1] == '\r' || in_[last - 1] == ' ' || in_[last - 1] == '\t')) --last;
    if (last > i_ && in_[last - 1] == '\\') fail(name_, "a // comment continued with a backslash at byte " + std::to_string(i_));
    i_ = end;
  }

  void skip_block_comment() {
    const std::size_t end = in_.find("*/", i_ + 2);
    if (end == std::string_view::npos) fail(name_, "unterminated /* comment at byte " + std::to_string(i_));
    const bool spans_lines = in_.substr(i_, end - i_).find('\n') != std::string_view::npos;
    i_ = end + 2;
    if (spans_lines) {
      end_line();
    } else if (!line_empty_) {
      pending_space_ = true;
    }
  }

  // The identifier or number that ends the output so far (its letters decide what a quote means).
  std::string_view trailing_word() const {
    std::size_t start = out_.size();
    while (start > 0 && (is_word_char(out_[start - 1]) || out_[start - 1] == '.')) --start;
    if (pending_space_) return {};
    return std::string_view(out_).substr(start);
  }

  void copy_string() {
    const std::string_view prefix = trailing_word();
    const bool raw = prefix == "R" || prefix == "LR" || prefix == "uR" || prefix == "UR" || prefix == "u8R";
    if (raw) {
      const std::size_t open = in_.find('(', i_);
      if (open == std::string_view::npos) fail(name_, "raw string literal without ( at byte " + std::to_string(i_));
      std::string closing(1, ')');
      closing.append(in_.substr(i_ + 1, open - i_ - 1));
      closing.push_back('"');
      const std::size_t close = in_.find(closing, open);
      if (close == std::string_view::npos) fail(name_, "unterminated raw string literal at byte " + std::to_string(i_));
      emit_text(in_.substr(i_, close + closing.size() - i_));
      i_ = close + closing.size();
      return;
    }
    copy_quoted('"');
  }

  void copy_quote() {
    const std::string_view word = trailing_word();
    if (!word.empty() && ((word[0] >= '0' && word[0] <= '9') || (word[0] == '.' && word.size() > 1))) {
      emit('\'');  // digit separator inside a number
      ++i_;
      return;
    }
    copy_quoted('\'');
  }

  void copy_quoted(char quote) {
    std::size_t j = i_ + 1;
    while (j < in_.size() && in_[j] != quote) {
      if (in_[j] == '\n') break;
      j += in_[j] == '\\' ? 2 : 1;
    }
    if (j >= in_.size() || in_[j] != quote) {
      fail(name_, std::string("unterminated ") + (quote == '"' ? "string" : "character") + " literal at byte " +
                      std::to_string(i_));
    }
    emit_text(in_.substr(i_, j + 1 - i_));
    i_ = j + 1;
  }

  std::string_view in_;
  std::string_view name_;
  std::string out_;
  std::size_t i_ = 0;
  bool line_empty_ = true;
  bool pending_space_ = false;
  bool continued_ = false;  // the previous output line ends with a backslash
};

}  // namespace

SourceKind source_kind(std::string_view path) {
  for (std::string_view ext : {".h", ".hpp", ".cpp", ".cu", ".cuh"}) {
    if (ends_with(path, ext)) return SourceKind::cpp;
  }
  if (ends_with(path, ".cmake") || ends_with(path, ".toml") || path == "CMakeLists.txt" ||
      ends_with(path, "/CMakeLists.txt")) {
    return SourceKind::hash_comments;
  }
  return SourceKind::verbatim;
}

std::string strip_cpp_source(std::string_view text, std::string_view name) { return CppStripper(text, name).run(); }

std::string strip_hash_comment_lines(std::string_view text) {
  std::string out;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(start, end - start);
    const std::size_t first = line.find_first_not_of(" \t\r");
    if (first != std::string_view::npos && line[first] != '#') {
      out += line;
      out += '\n';
    }
    start = end + 1;
  }
  return out;
}

std::string strip_source(std::string_view text, std::string_view path) {
  switch (source_kind(path)) {
    case SourceKind::cpp: return strip_cpp_source(text, path);
    case SourceKind::hash_comments: return strip_hash_comment_lines(text);
    case SourceKind::verbatim: break;
  }
  return std::string(text);
}

}  // namespace pgolf
