#include "train/run_log.h"

#include <fmt/core.h>

#include <algorithm>
#include <cstdio>

#include "core/error.h"

namespace pgolf {

RunLog::RunLog(const fs::path& dir, bool append, bool echo, bool progress) : echo_(echo), progress_on_(progress) {
  if (dir.empty()) return;
  fs::create_directories(dir);
  const auto mode = append ? std::ios::app : std::ios::trunc;
  log_.open(dir / "train.log", std::ios::out | mode);
  metrics_.open(dir / "metrics.jsonl", std::ios::out | mode);
  PG_CHECK(log_ && metrics_, "cannot write the run logs {} and {}", (dir / "train.log").string(),
           (dir / "metrics.jsonl").string());
}

RunLog::~RunLog() { clear_progress(); }

void RunLog::clear_progress() {
  if (!progress_shown_) return;
  std::fputs("\r\033[K", stderr);
  std::fflush(stderr);
  progress_shown_ = false;
}

void RunLog::line(const std::string& text, const nlohmann::json& metrics) {
  if (log_.is_open()) {
    log_ << text << '\n';
    log_.flush();
  }
  if (metrics_.is_open() && !metrics.is_null()) {
    metrics_ << metrics.dump() << '\n';
    metrics_.flush();
  }
  if (echo_) {
    clear_progress();
    std::fputs((text + "\n").c_str(), stdout);
    std::fflush(stdout);
  }
}

void RunLog::progress(const std::string& text) {
  if (!progress_on_) return;
  std::fputs(("\r\033[K" + text).c_str(), stderr);
  std::fflush(stderr);
  progress_shown_ = true;
}

std::string train_log_line(int64_t step, int64_t iterations, double train_loss, double train_ms) {
  return fmt::format("step:{}/{} train_loss:{:.4f} train_time:{:.0f}ms step_avg:{:.2f}ms", step, iterations,
                     train_loss, train_ms, train_ms / static_cast<double>(std::max<int64_t>(step, 1)));
}

std::string val_log_line(int64_t step, int64_t iterations, double val_loss, double val_bpb, double train_ms) {
  return fmt::format("step:{}/{} val_loss:{:.4f} val_bpb:{:.4f} train_time:{:.0f}ms step_avg:{:.2f}ms", step,
                     iterations, val_loss, val_bpb, train_ms, train_ms / static_cast<double>(std::max<int64_t>(step, 1)));
}

}  // namespace pgolf
