#include "model/batch.h"

#include <algorithm>

#include "backend/cpu/attention.h"
#include "core/error.h"

namespace pgolf {

std::vector<int32_t> Batch::segments() const {
  if (!cu_seqlens.empty()) return cu_seqlens;
  std::vector<int32_t> cu;
  for (int64_t r = 0; r <= rows; ++r) cu.push_back(static_cast<int32_t>(r * seq_len));
  return cu;
}

void Batch::validate(int vocab) const {
  PG_CHECK(rows > 0 && seq_len > 0, "batch: {} rows x {} tokens is empty", rows, seq_len);
  PG_CHECK(static_cast<int64_t>(inputs.size()) == tokens(), "batch: {} input ids for {} rows x {} tokens",
           inputs.size(), rows, seq_len);
  PG_CHECK(targets.empty() || targets.size() == inputs.size(), "batch: {} targets for {} inputs", targets.size(),
           inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i)
    PG_CHECK(inputs[i] >= 0 && inputs[i] < vocab, "batch: input id {} at position {} is outside the vocab {}",
             inputs[i], i, vocab);
  for (size_t i = 0; i < targets.size(); ++i)
    PG_CHECK(targets[i] >= 0 && targets[i] < vocab, "batch: target id {} at position {} is outside the vocab {}",
             targets[i], i, vocab);
  PG_CHECK(losses_from.empty() || static_cast<int64_t>(losses_from.size()) == rows,
           "batch: {} losses_from entries for {} rows", losses_from.size(), rows);
  for (size_t r = 0; r < losses_from.size(); ++r)
    PG_CHECK(losses_from[r] >= 0 && losses_from[r] <= seq_len, "batch: losses_from[{}] = {} is outside [0, {}]", r,
             losses_from[r], seq_len);
  if (cu_seqlens.empty()) return;
  const int64_t nseg = static_cast<int64_t>(cu_seqlens.size()) - 1;
  cpu::check_cu_seqlens(cu_seqlens.data(), nseg, tokens());
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t b = cu_seqlens[s], e = cu_seqlens[s + 1];
    if (e > b)
      PG_CHECK(b / seq_len == (e - 1) / seq_len, "batch: segment {} = [{}, {}) crosses a row boundary (rows of {})",
               s, b, e, seq_len);
  }
}

std::vector<Batch> split_batch(const Batch& batch, int64_t max_tokens) {
  PG_CHECK(max_tokens > 0, "split_batch: max_tokens must be positive, got {}", max_tokens);
  std::vector<Batch> out;
  if (batch.tokens() <= max_tokens) {
    out.push_back(batch);
    return out;
  }
  const std::vector<int32_t> cu = batch.segments();
  // Slice [t0, t1) of the batch's token arrays, its segment starts re-based and closed by its length.
  auto slice = [&](int64_t t0, int64_t t1, int64_t rows, int64_t seq_len, size_t& seg, int64_t pad) {
    Batch b;
    b.rows = rows;
    b.seq_len = seq_len;
    b.inputs.assign(batch.inputs.begin() + t0, batch.inputs.begin() + t1);
    if (!batch.targets.empty()) b.targets.assign(batch.targets.begin() + t0, batch.targets.begin() + t1);
    // Whole rows keep their losses_from; a row cut into pieces drops it (every loss is computed).
    if (!batch.losses_from.empty() && seq_len == batch.seq_len)
      b.losses_from.assign(batch.losses_from.begin() + t0 / seq_len, batch.losses_from.begin() + t1 / seq_len);
    if (!batch.cu_seqlens.empty()) {
      for (; seg + 1 < cu.size() && cu[seg] < t1; ++seg)
        if (cu[seg] >= t0 && (b.cu_seqlens.empty() || cu[seg] - t0 > b.cu_seqlens.back()))
          b.cu_seqlens.push_back(cu[seg] - static_cast<int32_t>(t0));
      const int32_t len = static_cast<int32_t>(t1 - t0);
      b.cu_seqlens.push_back(len);
      b.cu_seqlens.resize((b.cu_seqlens.size() + pad - 1) / pad * pad, len);
    }
    return b;
  };
  size_t seg = 0;
  if (batch.seq_len <= max_tokens) {
    const int64_t rows_per_piece = max_tokens / batch.seq_len;
    for (int64_t r0 = 0; r0 < batch.rows; r0 += rows_per_piece) {
      const int64_t r1 = std::min(batch.rows, r0 + rows_per_piece);
      out.push_back(slice(r0 * batch.seq_len, r1 * batch.seq_len, r1 - r0, batch.seq_len, seg, 1));
    }
    return out;
  }
  PG_CHECK(batch.rows == 1 && !batch.cu_seqlens.empty(),
           "split_batch: rows of {} tokens are more than max_tokens = {} (only a single row of segments can be cut)",
           batch.seq_len, max_tokens);
  const int64_t total = batch.tokens();
  size_t end = 0;  // index into cu of the current piece's last segment end
  for (int64_t t0 = 0; t0 < total;) {
    // The furthest segment end within max_tokens of t0.
    while (end + 1 < cu.size() && cu[end + 1] - t0 <= max_tokens) ++end;
    const int64_t t1 = cu[end];
    PG_CHECK(t1 > t0, "split_batch: the segment [{}, {}) of {} tokens is more than max_tokens = {}", t0,
             cu[end + 1], cu[end + 1] - t0, max_tokens);
    out.push_back(slice(t0, t1, 1, t1 - t0, seg, 64));
    t0 = t1;
  }
  return out;
}

}  // namespace pgolf
