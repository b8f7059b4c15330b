// Token shards in the challenge format (SPEC 2.2): a header of 256 little-endian int32
// (magic 20240520, version 1, token count, the rest zero) followed by `count` little-endian uint16 ids.
// File size = 1024 + 2 * count.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/fs.h"

namespace pgolf {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;
inline constexpr int64_t kShardHeaderInts = 256;
inline constexpr int64_t kShardHeaderBytes = kShardHeaderInts * 4;

// A read-only, memory-mapped, validated shard. Opening checks the header (magic, version, a
// non-negative count) and the exact file size; every error names the file and the bad value.
class Shard {
 public:
  // `vocab_size` > 0 also checks every id < vocab_size (one pass over the ids).
  explicit Shard(const fs::path& path, int64_t vocab_size = 0);

  std::span<const uint16_t> tokens() const { return tokens_; }
  int64_t size() const { return static_cast<int64_t>(tokens_.size()); }
  const fs::path& path() const { return file_.path(); }

  // Throws if some id >= vocab_size, naming the file, the first bad position and its id.
  void check_ids(int64_t vocab_size) const;

 private:
  MappedFile file_;
  std::span<const uint16_t> tokens_;
};

// Writes `tokens` as a shard at `path` atomically (the whole file appears at once, or not at all).
void write_shard(const fs::path& path, std::span<const uint16_t> tokens);

// The shards matching a glob pattern, sorted by name; throws when none matches.
std::vector<fs::path> find_shards(const std::string& pattern);

// The largest id in `tokens` (0 for an empty span).
uint16_t max_token_id(std::span<const uint16_t> tokens);

}  // namespace pgolf
