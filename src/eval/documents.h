// Document planning of per-document LoRA TTT (SPEC §6.5) and phased TTT (§6.7): pure counting, no
// model. Target index i predicts tokens[i + 1] (as in eval/windows.h).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace pgolf {

// Document i = tokens [b_i, b_{i+1}] (including the next document's BOS, so its last target is that
// BOS, as in the flat stream); the last document runs to the end of the stream. Its targets are
// first_target() .. first_target() + pred_len() - 1, and the union over all documents is every target
// of the stream exactly once. Tokens before the first BOS (a stream that does not start with one)
// form a document of their own, so that the union still covers the stream.
struct Document {
  int64_t start = 0;  // position of its BOS
  int64_t len = 0;    // tokens, including the next BOS
  int64_t pred_len() const { return len - 1; }
  int64_t first_target() const { return start; }
};
// Documents with at least one target, in stream order.
std::vector<Document> find_documents(std::span<const uint16_t> tokens, int bos_id);

// Chunk ci of a document with pred_len targets: targets [ci·C, min((ci+1)·C, pred_len)) predicted from
// the window [max(0, chunk_end − ctx), chunk_end) of the same document (no cross-document context).
struct ChunkWindow {
  int64_t win_start = 0;     // window start, relative to the document start
  int64_t win_len = 0;       // window tokens (<= ctx)
  int64_t chunk_offset = 0;  // first scored position inside the window
  int64_t chunk_len = 0;     // scored positions
};
int64_t num_doc_chunks(int64_t pred_len, int64_t chunk);  // ⌈pred_len / C⌉
ChunkWindow doc_chunk_window(int64_t ci, int64_t pred_len, int64_t chunk, int64_t ctx);

// Which end of the length order the LoRA TTT batches are cut from, and so which batch is partial.
//  - Shortest (#1530/S1560): cut from the shortest document up; the partial batch holds the longest.
//  - Longest (ttt_batch_cut = longest, the default): cut from the longest document down; the partial
//    batch holds the shortest. Each document's computation is the same either way (own adapters and
//    moments, lock-step chunks, no coupling between rows); only the grouping, and so the adapters'
//    draws, differ. The longest documents no longer run alone: a batch takes as many engine calls as
//    its longest document has chunks, so this saves the calls of the reference's second batch.
enum class BatchCut { Shortest, Longest };
BatchCut parse_batch_cut(const std::string& name);  // "shortest" | "longest"

// The LoRA TTT work queue: documents sorted by length (stable), cut into batches of `batch_size` from
// the end `cut` names, the batches handed out longest first (descending max length). Entry j of the
// result is the j-th batch handed out: its document indices, shortest first.
std::vector<std::vector<int64_t>> plan_doc_batches(std::span<const Document> docs, int64_t batch_size,
                                                   BatchCut cut);

// Phased TTT (#1610 one phase, #1626 several): phase k (0-based) trains on the first
// P_k = ⌊P·(k+1)/phases⌋ documents of the queue order; its scoring ends after the batch holding
// document P_k − 1. Returns, per phase, the number of queue documents trained on and the number of
// queue batches scored before it (both capped at what the queue holds).
struct PhaseBoundary {
  int64_t docs = 0;     // P_k
  int64_t batches = 0;  // queue batches up to and including the one holding document P_k − 1
};
std::vector<PhaseBoundary> plan_phases(int64_t prefix_docs, int phases,
                                       std::span<const std::vector<int64_t>> queue);

}  // namespace pgolf
