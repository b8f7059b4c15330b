// `pgolf prepare`: text -> token shards in the challenge format, as the reference exporter writes them
// (SPEC 2.3): every document is [BOS] + ids (no EOS), documents are concatenated back to back and a
// document may straddle two shards. Encoding runs on several threads; the output does not depend on
// their timing (documents are written in input order).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/fs.h"
#include "data/tokenizer.h"

namespace pgolf {

struct PrepareOptions {
  std::vector<fs::path> inputs;  // JSONL(.zst) or plain text (text_reader.h), read in this order
  fs::path out_dir;
  std::string name = "train";         // shards are out_dir/NAME_000000.bin, NAME_000001.bin, ...
  int64_t shard_tokens = 100'000'000;  // tokens per shard (the last one may be shorter)
  // > 0: hold out this many documents spread evenly over all inputs — document g (0-based, over
  // all inputs in order) is held out when g % (total / N) == 0, until N are taken — into the
  // separate shards NAME_heldout_000000.bin, ... (a held-out slice of the training text).
  int64_t heldout_docs = 0;
  // >= 0: the training documents are written in a random order drawn from Rng(shuffle_seed)
  // (every encoded document is kept in memory until the end); < 0: in input order.
  int64_t shuffle_seed = -1;
  int threads = 0;  // encoding threads; 0 = every core
};

struct PrepareCounts {
  int64_t documents = 0;
  int64_t tokens = 0;      // BOS included
  int64_t text_bytes = 0;  // UTF-8 bytes of the document texts as read
  int64_t heldout_documents = 0;
  int64_t heldout_tokens = 0;
};

struct PrepareInputSummary {
  fs::path path;
  PrepareCounts counts;
};

struct PrepareSummary {
  std::vector<PrepareInputSummary> inputs;
  PrepareCounts total;
  std::vector<fs::path> shards;          // training shards written, in order
  std::vector<fs::path> heldout_shards;  // held-out shards written, in order
  double seconds = 0.0;                  // wall time, counting pass included
};

// Progress, reported from the calling thread after each batch of documents is written.
struct PrepareProgress {
  PrepareCounts done;
  size_t input_index = 0;      // the input being written
  double input_fraction = 0.0;  // of that input's file read so far (compressed bytes for .zst)
  double seconds = 0.0;
};

// Writes the shards (each atomically) and removes stale shards of the same name with higher
// numbers left by an earlier run. Throws on a vocabulary above 65,536 pieces (ids are uint16).
PrepareSummary prepare_shards(const PrepareOptions& options, const Tokenizer& tokenizer,
                              const std::function<void(const PrepareProgress&)>& progress = {});

// The shard file name for `name`, `heldout` or not, number `index`: NAME_000012.bin / NAME_heldout_000012.bin.
std::string shard_file_name(const std::string& name, bool heldout, int64_t index);

}  // namespace pgolf
