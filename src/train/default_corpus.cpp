#include "train/default_corpus.h"

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <sstream>

#include "core/error.h"
#include "data/prepare.h"
#include "data/text_reader.h"
#include "data/tokenizer.h"
#include "data/tokenizer_train.h"

namespace pgolf {

std::vector<std::string> read_fortune_documents(const fs::path& fortune_dir) {
  PG_CHECK(fs::is_directory(fortune_dir),
           "{} does not exist: the default corpus comes from Debian's `fortunes` package "
           "(scripts/setup.sh installs it; or give --data/--val/--tokenizer)",
           fortune_dir.string());
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(fortune_dir)) {
    // The text files themselves: not the .dat indexes, not the .u8 symlinks.
    if (!e.is_regular_file() || e.is_symlink() || e.path().extension() == ".dat") continue;
    files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::vector<std::string> docs;
  for (const auto& f : files) {
    std::istringstream in(read_text_file(f));
    std::string line, doc;
    auto flush = [&] {
      std::string d(strip_whitespace(doc));
      if (!d.empty()) docs.push_back(std::move(d));
      doc.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%") flush();
      else doc += line + "\n";
    }
    flush();
  }
  PG_CHECK(!docs.empty(), "{} holds no fortune texts", fortune_dir.string());
  return docs;
}

DefaultData ensure_default_data(const fs::path& dir, const fs::path& fortune_dir, bool echo) {
  DefaultData d{(dir / "train_[0-9]*.bin").string(), (dir / "train_heldout_*.bin").string(),
                (dir / "tokenizer.model").string()};
  const fs::path done = dir / "READY";
  if (fs::exists(done)) return d;
  fs::create_directories(dir);
  const std::vector<std::string> docs = read_fortune_documents(fortune_dir);
  std::string jsonl;
  size_t bytes = 0;
  for (const auto& t : docs) {
    jsonl += nlohmann::json{{"text", t}}.dump() + "\n";
    bytes += t.size();
  }
  const fs::path corpus = dir / "corpus.jsonl";
  write_text_file_atomic(corpus, jsonl);
  if (echo) fmt::print("default corpus: {} documents, {:.2f} MB of text from {}\n", docs.size(), bytes / 1e6,
                       fortune_dir.string());

  TokenizerTrainOptions to;
  to.inputs = {corpus};
  to.out_prefix = dir / "tokenizer";
  to.vocab_size = 1024;
  to.max_sentence_length = 1 << 20;
  const TokenizerTrainSummary ts = train_tokenizer(to);
  if (echo) fmt::print("default corpus: trained a {}-piece tokenizer in {:.1f} s\n", ts.pieces, ts.seconds);

  const Tokenizer tok(d.tokenizer);
  PrepareOptions po;
  po.inputs = {corpus};
  po.out_dir = dir;
  po.name = "train";
  po.heldout_docs = std::max<int64_t>(1, static_cast<int64_t>(docs.size()) / 20);  // 5 % held out = validation
  po.shuffle_seed = 1337;
  const PrepareSummary ps = prepare_shards(po, tok);
  if (echo)
    fmt::print("default corpus: {} training tokens, {} held-out tokens (the validation set)\n",
               ps.total.tokens - ps.total.heldout_tokens, ps.total.heldout_tokens);
  write_text_file_atomic(done, "ok\n");
  return d;
}

}  // namespace pgolf
