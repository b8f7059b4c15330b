// File helpers: whole-file reads, atomic writes (temp file + fsync + rename), read-only mappings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace pgolf {

namespace fs = std::filesystem;

std::vector<uint8_t> read_file(const fs::path& path);
std::string read_text_file(const fs::path& path);

// Writes `bytes` to `path` so that a reader sees either the old file or the complete new one:
// the data go to `path.tmp.<pid>`, are fsync'ed, renamed over `path`, and the directory is fsync'ed.
void write_file_atomic(const fs::path& path, std::span<const uint8_t> bytes);
void write_text_file_atomic(const fs::path& path, const std::string& text);

// A read-only memory mapping of a whole file (empty files map to an empty span).
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const fs::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const fs::path& path() const { return path_; }

 private:
  void release();
  fs::path path_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Files matching a glob pattern (e.g. "dir/fineweb_train_*.bin"), sorted by name.
std::vector<fs::path> glob_sorted(const std::string& pattern);

}  // namespace pgolf
