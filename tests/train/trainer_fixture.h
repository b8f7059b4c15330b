// Small training runs for the trainer tests: synthetic training shards (documents with a learnable
// next-token rule), the FineWeb validation prefix, and a tiny model of a reference stack whose run
// takes milliseconds per step.
#pragma once

#include <string>
#include <vector>

#include "core/config.h"
#include "core/rng.h"
#include "data/shard.h"
#include "model/tiny_models.h"
#include "test_util.h"

namespace pgolf::test {

// Documents [BOS=1] + ids in [4, 1024): each id follows the previous one by a fixed rule plus a
// little noise, so a model can learn it and the loss falls.
inline std::vector<uint16_t> synthetic_tokens(int64_t count, uint64_t seed) {
  Rng rng(seed);
  std::vector<uint16_t> out;
  while (static_cast<int64_t>(out.size()) < count) {
    const int64_t length = 20 + static_cast<int64_t>(rng.below(180));
    out.push_back(1);
    uint16_t t = static_cast<uint16_t>(4 + rng.below(1020));
    for (int64_t i = 0; i < length && static_cast<int64_t>(out.size()) < count; ++i) {
      out.push_back(t);
      t = static_cast<uint16_t>(4 + (t * 7 + 13 + rng.below(3)) % 1020);
    }
  }
  out.resize(static_cast<size_t>(count));
  return out;
}

// Two training shards and one held-out shard in `dir`.
inline void write_synthetic_shards(const std::filesystem::path& dir) {
  write_shard(dir / "train_000000.bin", synthetic_tokens(40000, 1));
  write_shard(dir / "train_000001.bin", synthetic_tokens(30000, 2));
  write_shard(dir / "heldout_000000.bin", synthetic_tokens(4000, 3));
}

// The tiny model of `stack` (tests/model/tiny_models.h) with the sp1024 vocabulary, T = 16, 256
// tokens per step (8 micro-batches of 2 sequences on one rank), 8 iteration-based steps with
// validation every 4 on the first 256 targets of the FineWeb prefix.
inline Config tiny_run_config(const std::string& stack, const std::filesystem::path& data_dir) {
  Config c = tiny_preset(stack);
  c.set("vocab_size", int64_t{1024});
  c.set("tokenizer_path", sp1024_model().string());
  c.set("train_files", (data_dir / "train_*.bin").string());
  c.set("val_files", val_prefix_shard().string());
  c.set("train_seq_len", int64_t{16});
  c.set("train_batch_tokens", int64_t{256});
  c.set("iterations", int64_t{8});
  c.set("max_wallclock_seconds", 0.0);
  c.set("gptq_reserve_seconds", 0.0);
  c.set("warmdown_iters", int64_t{4});
  c.set("muon_momentum_warmup_steps", int64_t{4});
  c.set("val_loss_every", int64_t{4});
  c.set("train_log_every", int64_t{1});
  c.set("val_batch_tokens", int64_t{512});
  c.set("val_max_tokens", int64_t{256});
  c.set("val_rank_seq_multiple", int64_t{0});
  return c;
}

}  // namespace pgolf::test
