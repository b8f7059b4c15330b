// Sliding-window planning (SPEC §6.2) and the chunk plan of score-first TTT (§6.3): pure counting,
// no model. Target index i is the prediction of tokens[i + 1] from tokens[..i]; a stream of N + 1
// tokens has targets 0 .. N-1. A window starting at ws feeds inputs tokens[ws, ws + len) (right-padded
// to T) and predicts targets ws .. ws + len - 1, of which [score_begin, score_end) count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pgolf {

// Which windows exist and which part of each is scored.
//   Reference   (SW/#414/#549, I5/S562/#549-TTT): ws = 0, s, 2s, ... while ws < N; first window all,
//               others the last min(s, len) positions. Truncated tail windows rescore the last s
//               targets (T/s times in all), exactly as the logged numbers were computed.
//   Clean       (S1560's optional rule): ws while ws + T - s < N (window 0 always); first window all,
//               others from position T - s. Every target is scored exactly once.
//   FullWindows (S600): ws in [0, N - T) step s, full windows only; first all, others the last s.
//               Targets after the last window are not scored.
enum class WindowRule { Reference, Clean, FullWindows };
WindowRule parse_window_rule(const std::string& name);  // reference | clean | full_windows
const char* window_rule_name(WindowRule rule);

struct Window {
  int64_t start = 0;        // first input position = first target index
  int64_t len = 0;          // real tokens (<= T); the rest of the row is padding
  int64_t score_begin = 0;  // scored offsets [score_begin, score_end) within the window
  int64_t score_end = 0;
  int64_t first_scored() const { return start + score_begin; }
  int64_t scored() const { return score_end - score_begin; }
};

class WindowPlan {
 public:
  // n_targets = N; window = T; 0 < stride <= T.
  WindowPlan(int64_t n_targets, int64_t window, int64_t stride, WindowRule rule);

  int64_t size() const { return count_; }
  Window at(int64_t k) const;  // 0 <= k < size(); first_scored() increases with k
  int64_t n_targets() const { return n_; }
  int64_t window() const { return window_; }
  int64_t stride() const { return stride_; }
  WindowRule rule() const { return rule_; }

  // Totals over all windows (one pass): scored target-positions (a target counted once per window
  // that scores it) and distinct targets scored.
  struct Totals {
    int64_t scored_positions = 0;
    int64_t distinct_targets = 0;
  };
  Totals totals() const;

 private:
  int64_t n_, window_, stride_;
  WindowRule rule_;
  int64_t count_ = 0;
};

// [⌊total·r/W⌋, ⌊total·(r+1)/W⌋): the references' contiguous split of `total` items over W ranks.
struct IndexRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
IndexRange rank_slice(int64_t total, int rank, int world_size);

// Score-first chunked TTT (SPEC §6.3): chunk c holds targets [c·C, min((c+1)·C, N)); n = ⌈N/C⌉.
// Window k belongs to chunk min(⌊first_scored(k)/C⌋, n − 1). Because first_scored increases with k,
// each chunk's windows are one contiguous range of window indices.
class ChunkPlan {
 public:
  ChunkPlan(const WindowPlan& windows, int64_t chunk_tokens);

  int64_t size() const { return static_cast<int64_t>(window_begin_.size()) - 1; }  // n chunks
  int64_t chunk_tokens() const { return chunk_; }
  IndexRange targets(int64_t c) const;  // the chunk's targets
  IndexRange windows(int64_t c) const;  // the chunk's windows
  // The chunk's training sequences: ⌊chunk length / T⌋ non-overlapping T-token sequences from the
  // chunk start (sequence j = targets [start + j·T, start + (j+1)·T)).
  int64_t training_sequences(int64_t c, int64_t seq_len) const { return targets(c).size() / seq_len; }

 private:
  int64_t n_targets_, chunk_;
  std::vector<int64_t> window_begin_;  // [n + 1]
};

}  // namespace pgolf
