#include "data/shard.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "core/error.h"

namespace pgolf {

static_assert(std::endian::native == std::endian::little, "shards are little-endian; a big-endian host needs byte swaps");

Shard::Shard(const fs::path& path, int64_t vocab_size) : file_(path) {
  const std::string name = path.string();
  const int64_t file_bytes = static_cast<int64_t>(file_.size());
  PG_CHECK(file_bytes >= kShardHeaderBytes,
           "{}: {} bytes, shorter than the {}-byte shard header (truncated, or not a shard)", name, file_bytes,
           kShardHeaderBytes);
  int32_t header[3];
  std::memcpy(header, file_.data(), sizeof(header));
  PG_CHECK(header[0] == kShardMagic, "{}: magic {}, expected {} (not a shard in the challenge format)", name,
           header[0], kShardMagic);
  PG_CHECK(header[1] == kShardVersion, "{}: version {}, expected {}", name, header[1], kShardVersion);
  const int64_t count = header[2];
  PG_CHECK(count >= 0, "{}: token count {} in the header, expected a non-negative count", name, count);
  const int64_t expected_bytes = kShardHeaderBytes + 2 * count;
  PG_CHECK(file_bytes == expected_bytes,
           "{}: {} bytes, but its header says {} tokens, i.e. {} + 2*{} = {} bytes (truncated or corrupt)", name,
           file_bytes, count, kShardHeaderBytes, count, expected_bytes);
  // The mapping is page-aligned and the header is 1024 bytes, so the ids are 2-byte aligned.
  tokens_ = {reinterpret_cast<const uint16_t*>(file_.data() + kShardHeaderBytes), static_cast<size_t>(count)};
  if (vocab_size > 0) check_ids(vocab_size);
}

uint16_t max_token_id(std::span<const uint16_t> tokens) {
  uint16_t m = 0;
  for (uint16_t t : tokens) m = std::max(m, t);  // a branch-free reduction the compiler vectorizes
  return m;
}

void Shard::check_ids(int64_t vocab_size) const {
  if (tokens_.empty() || max_token_id(tokens_) < vocab_size) return;
  auto bad = std::find_if(tokens_.begin(), tokens_.end(), [&](uint16_t t) { return t >= vocab_size; });
  fail("{}: token {} has id {}, expected an id < vocab size {}", path().string(), bad - tokens_.begin(), *bad,
       vocab_size);
}

void write_shard(const fs::path& path, std::span<const uint16_t> tokens) {
  PG_CHECK(tokens.size() <= static_cast<size_t>(INT32_MAX), "{}: {} tokens do not fit the int32 count of a shard",
           path.string(), tokens.size());
  std::vector<uint8_t> bytes(static_cast<size_t>(kShardHeaderBytes) + 2 * tokens.size(), 0);
  const int32_t header[3] = {kShardMagic, kShardVersion, static_cast<int32_t>(tokens.size())};
  std::memcpy(bytes.data(), header, sizeof(header));
  if (!tokens.empty()) std::memcpy(bytes.data() + kShardHeaderBytes, tokens.data(), 2 * tokens.size());
  write_file_atomic(path, bytes);
}

std::vector<fs::path> find_shards(const std::string& pattern) {
  auto files = glob_sorted(pattern);
  PG_CHECK(!files.empty(), "no shard matches {}", pattern);
  return files;
}

}  // namespace pgolf
