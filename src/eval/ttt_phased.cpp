#include "eval/ttt_phased.h"

#include <algorithm>
#include <vector>

#include "eval/ttt_train.h"

namespace pgolf {

int64_t global_sgd_phase(Engine& engine, Communicator& comm, ScoringLedger& ledger, std::span<const uint16_t> tokens,
                         std::span<const Document> docs, const GlobalSgdOptions& o) {
  PG_CHECK(o.seq_len > 0 && o.chunk_tokens >= o.seq_len,
           "phased TTT: chunks of {} tokens must hold at least one sequence of {}", o.chunk_tokens, o.seq_len);
  std::vector<TargetRange> ranges;
  for (const Document& d : docs) ranges.push_back({d.first_target(), d.pred_len()});
  ledger.release(comm, ranges);

  // The documents' (input, target) pairs back to back, and where each document starts among them.
  std::vector<uint16_t> inputs, targets;
  std::vector<int64_t> doc_offset;
  for (const Document& d : docs) {
    doc_offset.push_back(static_cast<int64_t>(inputs.size()));
    const auto first = tokens.begin() + d.start;
    inputs.insert(inputs.end(), first, first + d.pred_len());
    targets.insert(targets.end(), first + 1, first + 1 + d.pred_len());
  }
  const int64_t total = static_cast<int64_t>(inputs.size());

  // Checks pairs [a, b) of the concatenation against the ledger, document by document.
  auto require_trainable = [&](int64_t a, int64_t b) {
    size_t i = static_cast<size_t>(std::upper_bound(doc_offset.begin(), doc_offset.end(), a) - doc_offset.begin() - 1);
    for (; i < docs.size() && doc_offset[i] < b; ++i) {
      const int64_t lo = std::max(a, doc_offset[i]), hi = std::min(b, doc_offset[i] + docs[i].pred_len());
      ledger.require_trainable({docs[i].first_target() + lo - doc_offset[i], hi - lo});
    }
  };

  const TttSession session(engine, o.optimizer, false);
  const int64_t T = o.seq_len;
  const int64_t n_chunks = (total + o.chunk_tokens - 1) / o.chunk_tokens;
  int64_t steps = 0;
  for (int64_t c = 0; c + 1 < n_chunks; ++c) {  // the last chunk is skipped (#1610)
    const int64_t chunk_start = c * o.chunk_tokens;
    const int64_t seqs = (std::min(chunk_start + o.chunk_tokens, total) - chunk_start) / T;
    const double scale = cosine_scale(c, n_chunks - 1);
    steps += train_sequences(
        engine, comm, seqs, o.batch_seqs, o.epochs,
        [&](int64_t s, int64_t n) {
          const int64_t a = chunk_start + s * T;
          require_trainable(a, a + n * T);
          return sequence_batch(std::span<const uint16_t>(inputs).subspan(static_cast<size_t>(a)),
                                std::span<const uint16_t>(targets).subspan(static_cast<size_t>(a)), n, T, o.bos_id);
        },
        [&](int64_t) { return scale; });
  }
  return steps;
}

}  // namespace pgolf
