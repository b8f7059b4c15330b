// A tiny model and a short validation stream for the evaluation-mode tests: the tiny baseline stack
// with vocabulary 1024, a stream whose every non-BOS position holds a different id (so each
// (input, target) pair names its target index), made-up byte tables, and settings that give every
// mode several chunks, documents, batches and phases at T = 16.
#pragma once

#include <functional>
#include <vector>

#include "data/bpb.h"
#include "dist/communicator.h"
#include "eval/modes.h"
#include "model/tiny_models.h"
#include "train/cpu_engine.h"

namespace pgolf::test {

inline constexpr int kEvalVocab = 1024;
inline constexpr int kEvalBos = 1;
inline constexpr int64_t kEvalSeqLen = 16;

// Documents of the given lengths (tokens after the BOS), ids 2, 3, ... in order.
inline std::vector<uint16_t> unique_id_stream(const std::vector<int>& doc_lengths) {
  std::vector<uint16_t> s;
  uint16_t next = 2;
  for (int n : doc_lengths) {
    s.push_back(kEvalBos);
    for (int i = 0; i < n; ++i) s.push_back(next++);
  }
  return s;
}

// 11 documents, 600 targets: several chunks of 64 and LoRA batches of 3 documents.
inline std::vector<uint16_t> audit_stream() { return unique_id_stream({37, 80, 12, 150, 55, 96, 25, 70, 44, 19, 1}); }

// Byte tables of a made-up tokenizer: ids 0 and 1 are control pieces, id t >= 2 is 1 + t % 4 bytes
// and starts with '▁' when t % 3 == 0.
inline ByteTables made_up_tables(int vocab) {
  ByteTables t;
  t.base_bytes.resize(static_cast<size_t>(vocab));
  t.has_leading_space.resize(static_cast<size_t>(vocab));
  t.is_boundary.resize(static_cast<size_t>(vocab));
  for (int i = 0; i < vocab; ++i) {
    const bool control = i < 2;
    t.base_bytes[static_cast<size_t>(i)] = control ? 0 : 1 + i % 4;
    t.has_leading_space[static_cast<size_t>(i)] = !control && i % 3 == 0;
    t.is_boundary[static_cast<size_t>(i)] = control;
  }
  return t;
}

// The evaluation settings of these tests (any model): every mode gets several chunks, documents,
// batches and phases at T = 16.
inline void apply_eval_test_settings(Config& c) {
  c.set("vocab_size", int64_t{kEvalVocab});
  c.set("eval_stride", int64_t{4});
  c.set("eval_batch_seqs", int64_t{8});
  c.set("sliding_rule", std::string("clean"));
  c.set("ttt_chunk_tokens", int64_t{64});  // 4 training sequences of 16 per chunk
  c.set("ttt_epochs", int64_t{2});
  c.set("ttt_batch_seqs", int64_t{2});
  c.set("ttt_lr", 0.05);
  c.set("ttt_lora_rank", int64_t{2});
  c.set("ttt_lora_lr", 0.01);
  c.set("ttt_chunk_size", int64_t{8});
  c.set("ttt_eval_seq_len", kEvalSeqLen);
  c.set("ttt_batch_size", int64_t{3});
  c.set("ttt_grad_steps", int64_t{2});
  c.set("phased_ttt_prefix_docs", int64_t{5});
  c.set("phased_ttt_phases", int64_t{2});
  c.set("phased_ttt_lr", 0.02);
}

inline Config eval_test_config() {
  Config c = tiny_preset("baseline");
  apply_eval_test_settings(c);
  return c;
}

inline ParamSet<float> eval_test_params(const Config& c, uint64_t seed = 3) {
  CpuModel<float> m(ModelConfig::from_config(c));
  perturbed_init(m, seed);
  return m.params();
}

// Runs fn(engine, comm) on `ranks` threads, each with a fresh CpuEngine holding `params`.
inline void on_ranks(int ranks, const Config& c, const ParamSet<float>& params,
                     const std::function<void(CpuEngine&, Communicator&)>& fn) {
  run_thread_group(ranks, [&](Communicator& comm) {
    CpuEngine engine(c, comm);
    engine.load_params(params);
    fn(engine, comm);
  });
}

}  // namespace pgolf::test
