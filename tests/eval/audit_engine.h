// Instruments for the legality test (ENGINEERING §7): an Engine that forwards every call to a
// CpuEngine and records, independently of the evaluation code's own bookkeeping,
//   - which model state ran every forward (base version = TTT steps taken so far; for LoRA forwards
//     also the adapter generation, the row and the row's optimizer steps),
//   - which validation targets every training step read (and, for LoRA, for which row),
//   - the order of events (a global sequence number).
// Targets are recognised from the batch contents: the test stream has a unique id at every position
// except BOS, so every (input, target) pair names its target index. A ScoreObserver attached to the
// ledger reports the scores the evaluation counts; each is matched to a row of the last forward with
// bit-identical losses, so a score cannot come from anywhere else.
#pragma once

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "eval/ledger.h"
#include "model/engine.h"
#include "train/cpu_engine.h"

namespace pgolf::test {

// A model state: base version and, for LoRA forwards, (rank, generation, row, steps of that row).
struct ModelState {
  int64_t base = 0;
  int rank = 0;
  int64_t generation = -1;  // -1: no adapters
  int64_t row = 0;
  int64_t lora_steps = 0;
};

// Shared by the ranks of one evaluation run.
class Audit {
 public:
  Audit(std::span<const uint16_t> stream, int vocab) : vocab_(vocab), scores_(stream.size() - 1) {
    for (size_t i = 0; i + 1 < stream.size(); ++i) {
      const bool fresh = pair_to_target_.emplace(key(stream[i], stream[i + 1]), static_cast<int64_t>(i)).second;
      if (!fresh) throw std::runtime_error("audit stream: a (prev, target) pair repeats");
    }
  }
  int64_t n_targets() const { return static_cast<int64_t>(scores_.size()); }
  // The target index of an (input, target) pair, or -1 (padding).
  int64_t target_of(int32_t input, int32_t target) const {
    auto it = pair_to_target_.find(key(input, target));
    return it == pair_to_target_.end() ? -1 : it->second;
  }

  int64_t next_seq() {
    std::lock_guard lock(mu_);
    return seq_++;
  }
  // Base step `version` (1-based) read these targets (the union over ranks: gradients are averaged).
  void record_base_step(int64_t version, const std::vector<int64_t>& targets, int64_t seq) {
    std::lock_guard lock(mu_);
    if (base_steps_.size() <= static_cast<size_t>(version)) base_steps_.resize(static_cast<size_t>(version) + 1);
    base_steps_[static_cast<size_t>(version)].insert(targets.begin(), targets.end());
    for (int64_t t : targets) trains_.push_back({t, seq});
  }
  // LoRA step `step` (1-based) of (rank, generation, row) read these targets.
  void record_lora_step(const ModelState& s, int64_t step, const std::vector<int64_t>& targets, int64_t seq) {
    std::lock_guard lock(mu_);
    auto& v = lora_steps_[{s.rank, s.generation, s.row}];
    if (v.size() <= static_cast<size_t>(step)) v.resize(static_cast<size_t>(step) + 1);
    v[static_cast<size_t>(step)].insert(targets.begin(), targets.end());
    for (int64_t t : targets) trains_.push_back({t, seq});
  }
  void record_score(int64_t target, const ModelState& s, int64_t seq) {
    std::lock_guard lock(mu_);
    scores_[static_cast<size_t>(target)].push_back({s, seq});
  }

  // Every target the state was trained on (its base versions and its row's adapter steps).
  std::set<int64_t> trained(const ModelState& s) const {
    std::set<int64_t> out;
    for (int64_t v = 1; v <= s.base && v < static_cast<int64_t>(base_steps_.size()); ++v)
      out.insert(base_steps_[static_cast<size_t>(v)].begin(), base_steps_[static_cast<size_t>(v)].end());
    if (s.generation >= 0) {
      auto it = lora_steps_.find({s.rank, s.generation, s.row});
      if (it != lora_steps_.end())
        for (int64_t k = 1; k <= s.lora_steps && k < static_cast<int64_t>(it->second.size()); ++k)
          out.insert(it->second[static_cast<size_t>(k)].begin(), it->second[static_cast<size_t>(k)].end());
    }
    return out;
  }

  struct Report {
    int64_t scored_not_once = 0;          // targets scored 0 or >= 2 times
    int64_t trained_before_scored = 0;    // training reads of targets not scored before
    int64_t scored_by_trained_model = 0;  // scores by a state trained on the target itself
    int64_t trained_on_later = 0;         // scores by a state trained on a target scored later
    int64_t trained_on_later_position = 0;  // ... or on a later stream position (stream-order modes)
    int64_t base_versions = 0, lora_states = 0, training_reads = 0;
    bool legal(bool stream_order) const {
      return scored_not_once == 0 && trained_before_scored == 0 && scored_by_trained_model == 0 &&
             trained_on_later == 0 && (!stream_order || trained_on_later_position == 0);
    }
  };
  Report check() const {
    Report r;
    r.base_versions = static_cast<int64_t>(base_steps_.size());
    r.lora_states = static_cast<int64_t>(lora_steps_.size());
    r.training_reads = static_cast<int64_t>(trains_.size());
    for (const auto& s : scores_)
      if (s.size() != 1) ++r.scored_not_once;
    auto first_score_seq = [&](int64_t t) {
      const auto& s = scores_[static_cast<size_t>(t)];
      return s.empty() ? INT64_MAX : s.front().seq;
    };
    for (const auto& tr : trains_)
      if (first_score_seq(tr.target) >= tr.seq) ++r.trained_before_scored;
    for (int64_t t = 0; t < n_targets(); ++t)
      for (const Score& sc : scores_[static_cast<size_t>(t)]) {
        const std::set<int64_t> tr = trained(sc.state);
        if (tr.count(t)) ++r.scored_by_trained_model;
        for (int64_t u : tr) {
          if (first_score_seq(u) >= sc.seq) ++r.trained_on_later;
          if (u > t) ++r.trained_on_later_position;
        }
      }
    return r;
  }

 private:
  struct Score {
    ModelState state;
    int64_t seq;
  };
  struct Train {
    int64_t target, seq;
  };
  int64_t key(int64_t a, int64_t b) const { return a * vocab_ + b; }

  int vocab_;
  std::mutex mu_;
  int64_t seq_ = 0;
  std::map<int64_t, int64_t> pair_to_target_;
  std::vector<std::vector<Score>> scores_;                // per target
  std::vector<std::set<int64_t>> base_steps_;             // [version] targets read by that step
  std::map<std::tuple<int, int64_t, int64_t>, std::vector<std::set<int64_t>>> lora_steps_;
  std::vector<Train> trains_;
};

// One rank's instrumented engine; also the observer of that rank's ledger.
class AuditEngine final : public Engine, public ScoreObserver {
 public:
  AuditEngine(CpuEngine& inner, Audit& audit, int rank) : inner_(inner), audit_(audit), rank_(rank) {}

  const ModelConfig& model_config() const override { return inner_.model_config(); }
  const ParamLayout& layout() const override { return inner_.layout(); }
  const char* backend_name() const override { return inner_.backend_name(); }
  void load_params(const ParamSet<float>& p) override { inner_.load_params(p); }
  void store_params(ParamSet<float>& p) const override { inner_.store_params(p); }
  TensorMap optimizer_state() const override { return inner_.optimizer_state(); }
  void load_optimizer_state(const TensorMap& s, const std::string& w) override { inner_.load_optimizer_state(s, w); }
  void init_ema() override { inner_.init_ema(); }
  void store_ema(ParamSet<float>& out) const override { inner_.store_ema(out); }
  void set_looping(bool on) override { inner_.set_looping(on); }
  void set_qat(bool on) override { inner_.set_qat(on); }
  StepResult train_step(std::span<const Batch> b, const StepControl& c) override { return inner_.train_step(b, c); }
  void accumulate_hessians(const Batch& b, TensorMap& h) override { inner_.accumulate_hessians(b, h); }

  void token_losses(const Batch& batch, std::vector<float>& nll) override {
    const int64_t seq = audit_.next_seq();
    inner_.token_losses(batch, nll);
    last_ = forward_of(batch, nll, seq, false);
  }

  void ttt_begin(const TttOptimizerConfig& c) override { inner_.ttt_begin(c); }
  double ttt_step(const Batch& batch, double lr_scale) override {
    lr_scales.push_back(lr_scale);
    const double loss = inner_.ttt_step(batch, lr_scale);
    // The update is in place once the gradient all-reduce returned: every rank has finished scoring.
    ++base_version_;
    audit_.record_base_step(base_version_, targets_of(batch, {}), audit_.next_seq());
    return loss;
  }
  void ttt_end() override { inner_.ttt_end(); }

  void lora_begin(const LoraConfig& l, int64_t rows, const LoraOptimizerConfig& o) override {
    inner_.lora_begin(l, rows, o);
    new_generation(rows);
  }
  void lora_reset(uint64_t seed) override {
    inner_.lora_reset(seed);
    new_generation(static_cast<int64_t>(row_steps_.size()));
  }
  void lora_score_and_train(const Batch& batch, std::span<const float> w, std::vector<float>& nll) override {
    const int64_t seq = audit_.next_seq();
    lora_tokens += batch.tokens();
    inner_.lora_score_and_train(batch, w, nll);
    last_ = forward_of(batch, nll, seq, true);  // losses of the forward before the update
    if (!w.empty()) lora_steps(batch, w);
  }

  // Pipelined calls: the forward runs (and its training step is recorded) at submission, with the row
  // states of that moment; the scores the ledger reports are matched against it once it is collected.
  void submit_token_losses(const Batch& batch) override {
    check_room();
    const int64_t seq = audit_.next_seq();
    std::vector<float> nll;
    inner_.token_losses(batch, nll);
    pending_.push_back(forward_of(batch, nll, seq, false));
  }
  void submit_lora(const Batch& batch, std::span<const float> w) override {
    check_room();
    const int64_t seq = audit_.next_seq();
    lora_tokens += batch.tokens();
    std::vector<float> nll;
    inner_.lora_score_and_train(batch, w, nll);
    pending_.push_back(forward_of(batch, nll, seq, true));
    if (!w.empty()) lora_steps(batch, w);
  }
  void collect(std::vector<float>& nll) override {
    if (pending_.empty()) throw std::runtime_error("collect without a pending call");
    last_ = std::move(pending_.front());
    pending_.pop_front();
    nll = last_.nll;
    ++collected;
  }
  int pending() const override { return static_cast<int>(pending_.size()); }
  void lora_train_step(const Batch& batch, std::span<const float> w) override {
    audit_.next_seq();
    lora_tokens += batch.tokens();
    inner_.lora_train_step(batch, w);
    lora_steps(batch, w);
  }
  void lora_end() override { inner_.lora_end(); }

  // ScoreObserver: the ledger counted nll for targets [first, first + n).
  void on_score(int64_t first, std::span<const float> nll) override {
    const int64_t n = static_cast<int64_t>(nll.size());
    for (const Slot& slot : last_.where[first]) {  // rows of the last forward holding `first`
      bool same = slot.col + n <= last_.T;
      for (int64_t k = 0; same && k < n; ++k) {
        const size_t at = static_cast<size_t>(slot.row * last_.T + slot.col + k);
        same = last_.target[at] == first + k && last_.nll[at] == nll[static_cast<size_t>(k)];
      }
      if (!same) continue;
      for (int64_t k = 0; k < n; ++k) audit_.record_score(first + k, last_.states[static_cast<size_t>(slot.row)], last_.seq);
      return;
    }
    unmatched_scores += n;
  }

  std::vector<double> lr_scales;   // every ttt_step's lr factor, in order
  int64_t collected = 0;           // pipelined calls collected
  int64_t unmatched_scores = 0;    // scores that match no row of the last forward
  int64_t lora_tokens = 0;         // tokens of the LoRA forwards (score-and-train and extra steps)

 private:
  struct Slot {
    int64_t row, col;
  };

  std::vector<int64_t> targets_of(const Batch& b, std::span<const float> weights) const {
    std::vector<int64_t> out;
    for (int64_t i = 0; i < b.tokens(); ++i) {
      if (!weights.empty() && weights[static_cast<size_t>(i)] == 0.0f) continue;
      const int64_t t = audit_.target_of(b.inputs[static_cast<size_t>(i)], b.targets[static_cast<size_t>(i)]);
      if (t < 0) throw std::runtime_error("training read a pair that is not in the validation stream");
      out.push_back(t);
    }
    return out;
  }
  void new_generation(int64_t rows) {
    ++generation_;
    row_steps_.assign(static_cast<size_t>(rows), 0);
  }
  ModelState state_of_row(int64_t row, bool lora) const {
    ModelState s{base_version_, rank_, -1, row, 0};
    if (lora) {
      s.generation = generation_;
      s.lora_steps = row_steps_[static_cast<size_t>(row)];
    }
    return s;
  }
  // A forward: its targets per position, losses, row states, and where each target sits.
  struct Forward {
    int64_t T = 0, seq = 0;
    std::vector<float> nll;
    std::vector<int64_t> target;
    std::vector<ModelState> states;
    std::map<int64_t, std::vector<Slot>> where;
  };
  Forward forward_of(const Batch& b, const std::vector<float>& nll, int64_t seq, bool lora) const {
    Forward f;
    f.T = b.seq_len;
    f.seq = seq;
    f.nll = nll;
    f.target.assign(static_cast<size_t>(b.tokens()), -1);
    for (int64_t r = 0; r < b.rows; ++r) f.states.push_back(state_of_row(r, lora));
    for (int64_t i = 0; i < b.tokens(); ++i) {
      const int64_t t = audit_.target_of(b.inputs[static_cast<size_t>(i)], b.targets[static_cast<size_t>(i)]);
      f.target[static_cast<size_t>(i)] = t;
      if (t >= 0) f.where[t].push_back({i / b.seq_len, i % b.seq_len});
    }
    return f;
  }
  void check_room() const {
    if (static_cast<int>(pending_.size()) >= kMaxPending) throw std::runtime_error("more pending calls than kMaxPending");
  }
  // One LoRA optimizer step: each row with non-zero weights learned from those positions.
  void lora_steps(const Batch& b, std::span<const float> w) {
    const int64_t seq = audit_.next_seq();
    for (int64_t r = 0; r < b.rows; ++r) {
      const auto row_w = w.subspan(static_cast<size_t>(r * b.seq_len), static_cast<size_t>(b.seq_len));
      Batch row;
      row.rows = 1;
      row.seq_len = b.seq_len;
      row.inputs.assign(b.inputs.begin() + r * b.seq_len, b.inputs.begin() + (r + 1) * b.seq_len);
      row.targets.assign(b.targets.begin() + r * b.seq_len, b.targets.begin() + (r + 1) * b.seq_len);
      const std::vector<int64_t> t = targets_of(row, row_w);
      const int64_t step = ++row_steps_[static_cast<size_t>(r)];
      if (!t.empty()) audit_.record_lora_step(state_of_row(r, true), step, t, seq);
    }
  }

  CpuEngine& inner_;
  Audit& audit_;
  int rank_;
  int64_t base_version_ = 0;
  int64_t generation_ = -1;
  std::vector<int64_t> row_steps_;
  Forward last_;                 // the forward the ledger's scores come from
  std::deque<Forward> pending_;  // submitted, not collected
};

}  // namespace pgolf::test
