#include "data/bpb.h"

#include <algorithm>
#include <cmath>

#include "data/shard.h"

namespace pgolf {

double BpbAccumulator::val_loss() const {
  PG_CHECK(tokens > 0, "val_loss of an empty evaluation (0 targets)");
  return loss_sum / tokens;
}

double BpbAccumulator::val_bpb() const {
  PG_CHECK(bytes > 0, "val_bpb of an evaluation with 0 bytes ({} targets)", tokens);
  const double bits_per_token = val_loss() / std::log(2.0);
  const double tokens_per_byte = tokens / bytes;
  return bits_per_token * tokens_per_byte;
}

int64_t usable_targets(int64_t n_tokens, int64_t seq_len) {
  PG_CHECK(seq_len > 0, "usable_targets: sequence length {} must be positive", seq_len);
  if (n_tokens < 1) return 0;
  return ((n_tokens - 1) / seq_len) * seq_len;
}

std::vector<uint16_t> load_validation_tokens(std::vector<fs::path> files, int64_t seq_len, int64_t vocab_size) {
  PG_CHECK(!files.empty(), "load_validation_tokens: no validation shard given");
  std::sort(files.begin(), files.end());
  std::vector<Shard> shards;
  int64_t total = 0;
  for (auto& f : files) {
    shards.emplace_back(f, vocab_size);
    total += shards.back().size();
  }
  int64_t keep = total;
  if (seq_len > 0) {
    const int64_t usable = usable_targets(total, seq_len);
    PG_CHECK(usable > 0, "validation shards ({} files, first {}) hold {} tokens, too few for one sequence of {} + 1",
             files.size(), files.front().string(), total, seq_len);
    keep = usable + 1;
  }
  std::vector<uint16_t> tokens;
  tokens.reserve(static_cast<size_t>(keep));
  for (auto& s : shards) {
    const int64_t take = std::min<int64_t>(s.size(), keep - static_cast<int64_t>(tokens.size()));
    tokens.insert(tokens.end(), s.tokens().begin(), s.tokens().begin() + take);
    if (static_cast<int64_t>(tokens.size()) == keep) break;
  }
  return tokens;
}

}  // namespace pgolf
