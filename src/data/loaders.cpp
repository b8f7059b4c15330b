#include "data/loaders.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/error.h"

namespace pgolf {

namespace {

std::vector<Shard> open_shards(const std::vector<fs::path>& files, int64_t vocab_size) {
  PG_CHECK(!files.empty(), "data loader: no shard given");
  std::vector<Shard> shards;
  shards.reserve(files.size());
  for (auto& f : files) shards.emplace_back(f, vocab_size);
  return shards;
}

void check_rank(int rank, int world_size) {
  PG_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "data loader: rank {} outside [0, world size {})", rank,
           world_size);
}

std::vector<int32_t> dense_cu_seqlens(int64_t rows, int64_t seq_len) {
  std::vector<int32_t> cu(static_cast<size_t>(rows + 1));
  for (int64_t r = 0; r <= rows; ++r) cu[r] = static_cast<int32_t>(r * seq_len);
  return cu;
}

// x = span[:-1], y = span[1:] of a span of rows * seq_len + 1 tokens.
void fill_shifted(Batch& b, std::span<const uint16_t> span, int64_t rows, int64_t seq_len) {
  const auto n = static_cast<size_t>(rows * seq_len);
  PG_CHECK(span.size() == n + 1, "fill_shifted: span of {} tokens for {} inputs", span.size(), n);
  b.rows = rows;
  b.seq_len = seq_len;
  b.inputs.assign(span.begin(), span.end() - 1);
  b.targets.assign(span.begin() + 1, span.end());
}

}  // namespace

int64_t local_batch_tokens(int64_t batch_tokens, int world_size, int grad_accum) {
  PG_CHECK(world_size >= 1 && grad_accum >= 1, "data loader: world size {} and grad_accum {} must be >= 1", world_size,
           grad_accum);
  const int64_t n = batch_tokens / (int64_t(world_size) * grad_accum);
  PG_CHECK(n > 0, "data loader: batch of {} tokens over {} ranks x {} accumulation steps leaves no token per rank",
           batch_tokens, world_size, grad_accum);
  return n;
}

DocSegments doc_segments(std::span<const int64_t> bos_positions, int64_t total, int64_t max_doc_len,
                         int64_t pad_multiple) {
  PG_CHECK(total > 0 && total <= INT32_MAX, "doc_segments: total {} outside [1, 2^31-1]", total);
  std::vector<int64_t> doc_starts;
  if (bos_positions.empty() || bos_positions.front() != 0) doc_starts.push_back(0);
  for (int64_t p : bos_positions) {
    PG_CHECK(p >= 0 && p < total && (doc_starts.empty() || p > doc_starts.back()),
             "doc_segments: BOS position {} not ascending within [0, {})", p, total);
    doc_starts.push_back(p);
  }
  DocSegments s;
  for (size_t d = 0; d < doc_starts.size(); ++d) {
    const int64_t end = d + 1 < doc_starts.size() ? doc_starts[d + 1] : total;
    const int64_t step = max_doc_len > 0 ? max_doc_len : end - doc_starts[d];
    for (int64_t start = doc_starts[d]; start < end; start += step) {
      s.cu_seqlens.push_back(static_cast<int32_t>(start));
      s.max_seqlen = std::max(s.max_seqlen, static_cast<int32_t>(std::min(end, start + step) - start));
    }
  }
  s.cu_seqlens.push_back(static_cast<int32_t>(total));
  const size_t padded = (s.cu_seqlens.size() + pad_multiple - 1) / pad_multiple * pad_multiple;
  s.cu_seqlens.resize(padded, static_cast<int32_t>(total));
  return s;
}

// ---- (a) sequential stream ----------------------------------------------------------------------

void to_json(nlohmann::json& j, const StreamState& s) { j = {{"shard", s.shard}, {"pos", s.pos}}; }
void from_json(const nlohmann::json& j, StreamState& s) {
  j.at("shard").get_to(s.shard);
  j.at("pos").get_to(s.pos);
}

SequentialLoader::SequentialLoader(const std::vector<fs::path>& files, int rank, int world_size, int64_t vocab_size)
    : shards_(open_shards(files, vocab_size)), rank_(rank), world_size_(world_size) {
  check_rank(rank, world_size);
  const bool any_tokens = std::any_of(shards_.begin(), shards_.end(), [](const Shard& s) { return s.size() > 0; });
  PG_CHECK(any_tokens, "sequential loader: the {} shards (first {}) hold no token", shards_.size(),
           files.front().string());
}

void SequentialLoader::restore(const StreamState& s) {
  PG_CHECK(s.shard >= 0 && s.shard < static_cast<int64_t>(shards_.size()),
           "sequential loader: saved shard {} outside the {} shards", s.shard, shards_.size());
  PG_CHECK(s.pos >= 0 && s.pos <= shards_[s.shard].size(), "sequential loader: saved position {} outside {} ({} tokens)",
           s.pos, shards_[s.shard].path().string(), shards_[s.shard].size());
  state_ = s;
}

void SequentialLoader::advance(int64_t n, uint16_t* out) {
  while (n > 0) {
    const Shard& shard = shards_[state_.shard];
    const int64_t avail = shard.size() - state_.pos;
    if (avail <= 0) {
      state_.shard = (state_.shard + 1) % static_cast<int64_t>(shards_.size());
      state_.pos = 0;
      continue;
    }
    const int64_t k = std::min(n, avail);
    if (out) {
      std::copy_n(shard.tokens().begin() + state_.pos, k, out);
      out += k;
    }
    state_.pos += k;
    n -= k;
  }
}

Batch SequentialLoader::next(int64_t batch_tokens, int grad_accum, int64_t seq_len) {
  const int64_t n_local = local_batch_tokens(batch_tokens, world_size_, grad_accum);
  PG_CHECK(seq_len > 0 && n_local % seq_len == 0, "sequential loader: {} tokens per rank are not rows of {}", n_local,
           seq_len);
  const int64_t span = n_local + 1;
  std::vector<uint16_t> mine(static_cast<size_t>(span));
  advance(rank_ * span, nullptr);
  advance(span, mine.data());
  advance((world_size_ - 1 - rank_) * span, nullptr);
  Batch b;
  fill_shifted(b, mine, n_local / seq_len, seq_len);
  b.cu_seqlens = dense_cu_seqlens(b.rows, seq_len);
  b.max_seqlen = static_cast<int32_t>(seq_len);
  return b;
}

// ---- (b) document packing ----------------------------------------------------------------------

void to_json(nlohmann::json& j, const DocPackState& s) { j = {{"shard", s.shard}, {"cursor", s.cursor}}; }
void from_json(const nlohmann::json& j, DocPackState& s) {
  j.at("shard").get_to(s.shard);
  j.at("cursor").get_to(s.cursor);
}

DocPackingLoader::DocPackingLoader(const std::vector<fs::path>& files, int bos_id, int rank, int world_size,
                                   int64_t vocab_size)
    : shards_(open_shards(files, vocab_size)), bos_id_(static_cast<uint16_t>(bos_id)), rank_(rank),
      world_size_(world_size) {
  check_rank(rank, world_size);
  PG_CHECK(bos_id >= 0 && bos_id <= 65535, "document packing: BOS id {} is not a uint16 id", bos_id);
  enter_shard(0);
}

void DocPackingLoader::enter_shard(int64_t index) {
  const Shard& shard = shards_[index];
  bos_positions_.clear();
  auto toks = shard.tokens();
  for (size_t i = 0; i < toks.size(); ++i)
    if (toks[i] == bos_id_) bos_positions_.push_back(static_cast<int64_t>(i));
  PG_CHECK(!bos_positions_.empty(), "document packing: {} ({} tokens) holds no BOS (id {})", shard.path().string(),
           shard.size(), bos_id_);
  shard_ = index;
  cursor_ = bos_positions_.front();
}

void DocPackingLoader::restore(const DocPackState& s) {
  PG_CHECK(s.shard >= 0 && s.shard < static_cast<int64_t>(shards_.size()),
           "document packing: saved shard {} outside the {} shards", s.shard, shards_.size());
  enter_shard(s.shard);
  PG_CHECK(s.cursor >= 0 && s.cursor <= shards_[s.shard].size(),
           "document packing: saved cursor {} outside {} ({} tokens)", s.cursor, shards_[s.shard].path().string(),
           shards_[s.shard].size());
  cursor_ = s.cursor;
}

Batch DocPackingLoader::next(int64_t batch_tokens, int grad_accum, int64_t max_doc_len) {
  const int64_t n_local = local_batch_tokens(batch_tokens, world_size_, grad_accum);
  const int64_t span = n_local + 1;
  const int64_t global_span = world_size_ * span;
  // Skip the rest of every shard that cannot hold the whole global span; one full lap finding none is an error.
  for (size_t skipped = 0; cursor_ + global_span > shards_[shard_].size(); ++skipped) {
    PG_CHECK(skipped < shards_.size(), "document packing: no shard holds a step of {} x {} tokens after its first BOS",
             world_size_, span);
    enter_shard((shard_ + 1) % static_cast<int64_t>(shards_.size()));
  }
  const int64_t local_start = cursor_ + rank_ * span;
  Batch b;
  fill_shifted(b, shards_[shard_].tokens().subspan(local_start, span), 1, n_local);
  auto lo = std::lower_bound(bos_positions_.begin(), bos_positions_.end(), local_start);
  auto hi = std::lower_bound(lo, bos_positions_.end(), local_start + n_local);
  std::vector<int64_t> starts(lo, hi);
  for (auto& p : starts) p -= local_start;
  DocSegments seg = doc_segments(starts, n_local, max_doc_len);
  b.cu_seqlens = std::move(seg.cu_seqlens);
  b.max_seqlen = seg.max_seqlen;
  cursor_ += global_span;
  return b;
}

// ---- (c) shuffled sequences --------------------------------------------------------------------

void to_json(nlohmann::json& j, const ShuffleState& s) {
  j = {{"epoch_rng_state", s.epoch_rng_state}, {"drawn", s.drawn}};
}
void from_json(const nlohmann::json& j, ShuffleState& s) {
  j.at("epoch_rng_state").get_to(s.epoch_rng_state);
  j.at("drawn").get_to(s.drawn);
}

ShuffledSequenceLoader::ShuffledSequenceLoader(const std::vector<fs::path>& files, int rank, int world_size,
                                               int64_t seq_len, uint64_t seed, int64_t vocab_size)
    : world_size_(world_size), seq_len_(seq_len), rng_(Rng(seed).fork(static_cast<uint64_t>(rank))) {
  check_rank(rank, world_size);
  PG_CHECK(seq_len > 0, "shuffled loader: sequence length {} must be positive", seq_len);
  std::vector<fs::path> owned;
  for (size_t i = static_cast<size_t>(rank); i < files.size(); i += static_cast<size_t>(world_size))
    owned.push_back(files[i]);
  PG_CHECK(!owned.empty(), "shuffled loader: rank {} of {} owns none of the {} shards", rank, world_size, files.size());
  shards_ = open_shards(owned, vocab_size);
  new_epoch();
}

void ShuffledSequenceLoader::new_epoch() {
  epoch_rng_state_ = rng_.state();
  drawn_ = 0;
  starts_.assign(shards_.size(), {});
  for (size_t si = 0; si < shards_.size(); ++si) {
    const int64_t n = shards_[si].size();
    const int64_t max_phase = std::min(seq_len_ - 1, std::max<int64_t>(0, n - seq_len_ - 1));
    const int64_t phase = max_phase > 0 ? static_cast<int64_t>(rng_.below(static_cast<uint64_t>(max_phase + 1))) : 0;
    const int64_t windows = std::max<int64_t>(0, (n - 1 - phase) / seq_len_);
    std::vector<int64_t>& order = starts_[si];
    order.resize(static_cast<size_t>(windows));
    std::iota(order.begin(), order.end(), 0);
    for (int64_t i = windows - 1; i > 0; --i)  // Fisher-Yates
      std::swap(order[i], order[rng_.below(static_cast<uint64_t>(i + 1))]);
    for (auto& w : order) w = phase + w * seq_len_;
  }
}

std::pair<size_t, int64_t> ShuffledSequenceLoader::draw() {
  auto remaining = [&] {
    uint64_t total = 0;
    for (auto& s : starts_) total += s.size();
    return total;
  };
  if (remaining() == 0) {
    new_epoch();
    PG_CHECK(remaining() > 0, "shuffled loader: no owned shard (first {}) holds a sequence of {} + 1 tokens",
             shards_.front().path().string(), seq_len_);
  }
  uint64_t pick = rng_.below(remaining());
  size_t si = 0;
  while (pick >= starts_[si].size()) pick -= starts_[si++].size();
  const int64_t start = starts_[si].back();
  starts_[si].pop_back();
  ++drawn_;
  return {si, start};
}

void ShuffledSequenceLoader::restore(const ShuffleState& s) {
  rng_ = Rng(s.epoch_rng_state);
  new_epoch();
  uint64_t windows = 0;
  for (auto& st : starts_) windows += st.size();
  PG_CHECK(s.drawn >= 0 && static_cast<uint64_t>(s.drawn) <= windows,
           "shuffled loader: saved state has {} sequences drawn, the epoch holds {}", s.drawn, windows);
  for (int64_t i = 0; i < s.drawn; ++i) draw();
}

Batch ShuffledSequenceLoader::next(int64_t batch_tokens, int grad_accum) {
  const int64_t rows = local_batch_tokens(batch_tokens, world_size_, grad_accum) / seq_len_;
  PG_CHECK(rows > 0, "shuffled loader: {} tokens per rank hold no sequence of {}",
           local_batch_tokens(batch_tokens, world_size_, grad_accum), seq_len_);
  Batch b;
  b.rows = rows;
  b.seq_len = seq_len_;
  b.inputs.resize(static_cast<size_t>(rows * seq_len_));
  b.targets.resize(b.inputs.size());
  for (int64_t r = 0; r < rows; ++r) {
    auto [si, start] = draw();
    auto window = shards_[si].tokens().subspan(static_cast<size_t>(start), static_cast<size_t>(seq_len_ + 1));
    std::copy(window.begin(), window.end() - 1, b.inputs.begin() + r * seq_len_);
    std::copy(window.begin() + 1, window.end(), b.targets.begin() + r * seq_len_);
  }
  b.cu_seqlens = dense_cu_seqlens(rows, seq_len_);
  b.max_seqlen = static_cast<int32_t>(seq_len_);
  return b;
}

}  // namespace pgolf
