// The scoring ledger: every evaluation mode counts its scores through it, and every test-time-training
// batch is checked against it before the engine sees it, so that the legality rules (ENGINEERING §7,
// SPEC §1) hold by construction:
//   - a target is scored once (a second score throws; only the reference sliding rule's tail
//     rescoring is let through, by a ledger made for it: one that allows no training, or the
//     non-record pre-evaluation ledger below);
//   - training may only read targets that were scored before — on this rank (documents of LoRA TTT
//     live on one rank) or on all ranks together, confirmed by a collective count (score-first TTT
//     and the phased global SGD train on targets that other ranks scored).
// The one mode that breaks the rule on purpose (s562's pre-evaluation TTT) must make its ledger with
// Policy::PreEvalNotLegal; the ledger then lets training through and reports the run as not legal.
// Per-target state is one byte: a 62 M-target stream costs 62 MB of host memory.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "data/bpb.h"

namespace pgolf {

class Communicator;

struct TargetRange {
  int64_t first = 0;  // first target index (target i predicts tokens[i + 1])
  int64_t count = 0;
};

// Sees every score the ledger accepts (tests record which model state produced it).
class ScoreObserver {
 public:
  virtual ~ScoreObserver() = default;
  virtual void on_score(int64_t first_target, std::span<const float> nll) = 0;
};

class ScoringLedger {
 public:
  enum class Policy {
    ScoreFirst,           // legal: each target once, training only on scored targets
    ReferenceRescoring,   // no training; the reference sliding rule may rescore targets
    PreEvalNotLegal,      // s562 pre-evaluation TTT: training on unscored targets and rescoring let through
  };

  // `tokens` = the stream (N + 1 tokens), kept by reference: it must outlive the ledger.
  ScoringLedger(std::span<const uint16_t> tokens, const ByteTables& tables, Policy policy,
                ScoreObserver* observer = nullptr);

  int64_t num_targets() const { return static_cast<int64_t>(flags_.size()); }
  Policy policy() const { return policy_; }
  bool legal() const { return policy_ != Policy::PreEvalNotLegal; }

  // Adds the NLLs of targets [first, first + nll.size()) (loss in fp64, count, bytes of SPEC §2.6).
  void score(int64_t first, std::span<const float> nll);

  // Collective (every rank passes the same ranges): checks that every target of `ranges` was scored
  // exactly once over all ranks (count and index sum, all-reduced), then makes them trainable.
  void release(Communicator& comm, std::span<const TargetRange> ranges);
  // Local: makes targets trainable that this rank scored itself.
  void release_local(TargetRange range);
  // Throws unless every target of `range` is trainable (always passes under PreEvalNotLegal).
  void require_trainable(TargetRange range) const;

  const BpbAccumulator& local_sums() const { return sums_; }
  BpbAccumulator global_sums(Communicator& comm) const;  // collective: fp64 sums over all ranks

 private:
  // Per-target flags: scored on this rank; trainable (scored here or, per release(), on some rank).
  enum Flag : uint8_t { kScoredHere = 1, kTrainable = 2 };
  void check_range(TargetRange r, const char* what) const;

  std::span<const uint16_t> tokens_;
  const ByteTables& tables_;
  Policy policy_;
  ScoreObserver* observer_;
  std::vector<uint8_t> flags_;  // [N]
  BpbAccumulator sums_;
};

}  // namespace pgolf
