// The outputs of a training run as it goes: train.log (the references' log lines), metrics.jsonl
// (one JSON object per metric line), the same lines on stdout, and a live progress line on a
// terminal. Only rank 0 writes; other ranks construct it with no directory and echo off.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/fs.h"

namespace pgolf {

class RunLog {
 public:
  // `dir` empty: no files. `append`: continue the files of a resumed run. `progress`: draw the
  // progress line on stderr (meant for terminals).
  RunLog(const fs::path& dir, bool append, bool echo, bool progress);
  ~RunLog();
  RunLog(const RunLog&) = delete;
  RunLog& operator=(const RunLog&) = delete;

  // One log line, and its metrics object (null: the line has none). Both are flushed at once, so a
  // killed run keeps every line it printed.
  void line(const std::string& text, const nlohmann::json& metrics = nullptr);
  // Replaces the progress line (no-op unless progress is on).
  void progress(const std::string& text);

 private:
  void clear_progress();

  std::ofstream log_, metrics_;
  bool echo_, progress_on_, progress_shown_ = false;
};

// "step:N/M train_loss:X train_time:Yms step_avg:Zms" (the references' format).
std::string train_log_line(int64_t step, int64_t iterations, double train_loss, double train_ms);
// "step:N/M val_loss:X val_bpb:Y train_time:Yms step_avg:Zms".
std::string val_log_line(int64_t step, int64_t iterations, double val_loss, double val_bpb, double train_ms);

}  // namespace pgolf
