#include "eval/documents.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace pgolf {

std::vector<Document> find_documents(std::span<const uint16_t> tokens, int bos_id) {
  std::vector<int64_t> starts;
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t i = 0; i < n; ++i)
    if (tokens[static_cast<size_t>(i)] == bos_id || i == 0) starts.push_back(i);
  std::vector<Document> docs;
  for (size_t i = 0; i < starts.size(); ++i) {
    // Up to and including the next start (the next BOS), or to the end of the stream.
    const int64_t end = i + 1 < starts.size() ? starts[i + 1] + 1 : n;
    Document d{starts[i], end - starts[i]};
    if (d.pred_len() > 0) docs.push_back(d);
  }
  return docs;
}

int64_t num_doc_chunks(int64_t pred_len, int64_t chunk) {
  PG_CHECK(chunk > 0, "ttt_chunk_size = {} must be positive", chunk);
  return (pred_len + chunk - 1) / chunk;
}

ChunkWindow doc_chunk_window(int64_t ci, int64_t pred_len, int64_t chunk, int64_t ctx) {
  PG_CHECK(chunk > 0 && chunk <= ctx, "LoRA TTT: chunk {} must be positive and at most the context {}", chunk, ctx);
  PG_CHECK(ci >= 0 && ci * chunk < pred_len, "chunk {} of a document with {} targets (chunk size {})", ci, pred_len,
           chunk);
  const int64_t chunk_start = ci * chunk;
  const int64_t chunk_end = std::min(chunk_start + chunk, pred_len);
  ChunkWindow w;
  w.win_start = std::max<int64_t>(0, chunk_end - ctx);
  w.win_len = chunk_end - w.win_start;
  w.chunk_offset = chunk_start - w.win_start;
  w.chunk_len = chunk_end - chunk_start;
  return w;
}

BatchCut parse_batch_cut(const std::string& name) {
  if (name == "shortest") return BatchCut::Shortest;
  if (name == "longest") return BatchCut::Longest;
  fail("ttt_batch_cut = \"{}\": expected shortest or longest", name);
}

std::vector<std::vector<int64_t>> plan_doc_batches(std::span<const Document> docs, int64_t batch_size, BatchCut cut) {
  PG_CHECK(batch_size > 0, "ttt_batch_size = {} must be positive", batch_size);
  std::vector<int64_t> order(docs.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return docs[static_cast<size_t>(a)].len < docs[static_cast<size_t>(b)].len; });
  const size_t n = order.size(), size = static_cast<size_t>(batch_size);
  // Batch boundaries in `order`: multiples of the size from the cut's end.
  const size_t first = cut == BatchCut::Shortest ? 0 : n % size;
  std::vector<std::vector<int64_t>> batches;
  for (size_t i = 0; i < n;) {
    const size_t end = i < first ? first : std::min(n, i + size);
    batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(i), order.begin() + static_cast<std::ptrdiff_t>(end));
    i = end;
  }
  // The batches' maximum lengths ascend: hand them out in reverse.
  std::reverse(batches.begin(), batches.end());
  return batches;
}

std::vector<PhaseBoundary> plan_phases(int64_t prefix_docs, int phases, std::span<const std::vector<int64_t>> queue) {
  PG_CHECK(phases >= 1 && prefix_docs >= 1, "phased TTT: {} phases over {} prefix documents (both must be >= 1)",
           phases, prefix_docs);
  int64_t total = 0;
  for (const auto& b : queue) total += static_cast<int64_t>(b.size());
  std::vector<PhaseBoundary> out;
  for (int k = 0; k < phases; ++k) {
    PhaseBoundary p;
    p.docs = std::min(total, prefix_docs * (k + 1) / phases);
    int64_t seen = 0;
    while (p.batches < static_cast<int64_t>(queue.size()) && seen < p.docs)
      seen += static_cast<int64_t>(queue[static_cast<size_t>(p.batches++)].size());
    out.push_back(p);
  }
  return out;
}

}  // namespace pgolf
