// The data `pgolf run` uses when none are given: real English text that scripts/setup.sh installs
// from Debian (the `fortunes` and `fortunes-min` packages: /usr/share/games/fortunes, about 2.5 MB of
// quotations, jokes and literature excerpts), split into documents at the fortune files' "%" lines,
// tokenized with a 1024-piece BPE tokenizer trained on it with the challenge settings, written as
// training shards plus a held-out slice that serves as the validation set.
#pragma once

#include <string>
#include <vector>

#include "core/fs.h"

namespace pgolf {

struct DefaultData {
  std::string train_glob;  // e.g. data/default/train_[0-9]*.bin
  std::string val_glob;    // the held-out shards
  std::string tokenizer;   // data/default/tokenizer.model
};

// The fortune texts as documents (trimmed, empty ones dropped), in file-name order.
std::vector<std::string> read_fortune_documents(const fs::path& fortune_dir);

// Builds the corpus, tokenizer and shards in `dir` unless they are already there; returns their paths.
DefaultData ensure_default_data(const fs::path& dir, const fs::path& fortune_dir, bool echo);

}  // namespace pgolf
