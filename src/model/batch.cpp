#include "model/batch.h"

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

}  // namespace pgolf
