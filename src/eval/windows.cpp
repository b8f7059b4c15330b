#include "eval/windows.h"

#include <algorithm>

#include "core/error.h"

namespace pgolf {

WindowRule parse_window_rule(const std::string& name) {
  if (name == "reference") return WindowRule::Reference;
  if (name == "clean") return WindowRule::Clean;
  if (name == "full_windows") return WindowRule::FullWindows;
  fail("sliding_rule = \"{}\": expected reference, clean or full_windows", name);
}

const char* window_rule_name(WindowRule rule) {
  switch (rule) {
    case WindowRule::Reference: return "reference";
    case WindowRule::Clean: return "clean";
    case WindowRule::FullWindows: return "full_windows";
  }
  return "?";
}

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

WindowPlan::WindowPlan(int64_t n_targets, int64_t window, int64_t stride, WindowRule rule)
    : n_(n_targets), window_(window), stride_(stride), rule_(rule) {
  PG_CHECK(n_targets > 0, "sliding windows over {} targets: the validation stream is empty", n_targets);
  PG_CHECK(window > 0 && stride > 0 && stride <= window,
           "sliding windows: stride {} and window {} must satisfy 0 < stride <= window", stride, window);
  switch (rule) {
    case WindowRule::Reference: count_ = ceil_div(n_, stride_); break;
    case WindowRule::Clean:
      // k·s + T − s < N  <=>  k < (N − T + s) / s; window 0 always exists.
      count_ = std::max<int64_t>(1, n_ - window_ + stride_ > 0 ? ceil_div(n_ - window_ + stride_, stride_) : 0);
      break;
    case WindowRule::FullWindows:
      PG_CHECK(n_ > window_, "sliding_rule = full_windows needs more than T = {} targets, the stream has {}", window_,
               n_);
      count_ = ceil_div(n_ - window_, stride_);
      break;
  }
}

Window WindowPlan::at(int64_t k) const {
  PG_CHECK(k >= 0 && k < count_, "window {} outside the plan of {} windows", k, count_);
  Window w;
  w.start = k * stride_;
  w.len = std::min(window_, n_ - w.start);
  w.score_end = w.len;
  if (k == 0) {
    w.score_begin = 0;
  } else if (rule_ == WindowRule::Reference) {
    w.score_begin = std::max<int64_t>(w.len - stride_, 0);
  } else {
    w.score_begin = window_ - stride_;  // Clean: len > T − s by the window condition; FullWindows: len = T
  }
  return w;
}

WindowPlan::Totals WindowPlan::totals() const {
  Totals t;
  int64_t covered_to = 0;  // scored spans are contiguous and non-decreasing in k
  for (int64_t k = 0; k < count_; ++k) {
    const Window w = at(k);
    t.scored_positions += w.scored();
    const int64_t end = w.start + w.score_end;
    t.distinct_targets += std::max<int64_t>(0, end - std::max(covered_to, w.first_scored()));
    covered_to = std::max(covered_to, end);
  }
  return t;
}

IndexRange rank_slice(int64_t total, int rank, int world_size) {
  PG_CHECK(world_size > 0 && rank >= 0 && rank < world_size, "rank {} of world size {}", rank, world_size);
  return {total * rank / world_size, total * (rank + 1) / world_size};
}

ChunkPlan::ChunkPlan(const WindowPlan& windows, int64_t chunk_tokens)
    : n_targets_(windows.n_targets()), chunk_(chunk_tokens) {
  PG_CHECK(chunk_tokens > 0, "ttt_chunk_tokens = {} must be positive", chunk_tokens);
  const int64_t n_chunks = ceil_div(n_targets_, chunk_);
  window_begin_.assign(static_cast<size_t>(n_chunks + 1), windows.size());
  window_begin_[0] = 0;
  // Walk the windows once; chunk c starts at the first window whose chunk is >= c.
  int64_t next_chunk = 1;
  for (int64_t k = 0; k < windows.size() && next_chunk < n_chunks; ++k) {
    const int64_t c = std::min(windows.at(k).first_scored() / chunk_, n_chunks - 1);
    while (next_chunk <= c) window_begin_[static_cast<size_t>(next_chunk++)] = k;
  }
}

IndexRange ChunkPlan::targets(int64_t c) const {
  PG_CHECK(c >= 0 && c < size(), "chunk {} outside the plan of {} chunks", c, size());
  return {c * chunk_, std::min((c + 1) * chunk_, n_targets_)};
}

IndexRange ChunkPlan::windows(int64_t c) const {
  PG_CHECK(c >= 0 && c < size(), "chunk {} outside the plan of {} chunks", c, size());
  return {window_begin_[static_cast<size_t>(c)], window_begin_[static_cast<size_t>(c) + 1]};
}

}  // namespace pgolf
