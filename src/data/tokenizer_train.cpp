#include "data/tokenizer_train.h"

#include <fmt/format.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <thread>
#include <unordered_map>

#include "core/error.h"
#include "data/text_reader.h"
#include "data/tokenizer.h"

namespace pgolf {

namespace {

// Feeds the cleaned documents of every input, in order, to SentencePiece. Reading errors are kept
// (SentencePiece only sees a failed status) and rethrown with their own message after training.
class DocumentIterator final : public sentencepiece::SentenceIterator {
 public:
  DocumentIterator(const std::vector<fs::path>& inputs, int64_t max_docs) : inputs_(inputs), max_docs_(max_docs) {
    Next();
  }
  bool done() const override { return done_; }
  void Next() override {
    try {
      advance();
    } catch (...) {
      error_ = std::current_exception();
      done_ = true;
    }
  }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override {
    if (!error_) return sentencepiece::util::Status();
    return sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal, "reading the training text failed");
  }
  std::exception_ptr error() const { return error_; }
  int64_t documents() const { return documents_; }

 private:
  void advance() {
    while (max_docs_ <= 0 || read_ < max_docs_) {
      if (!reader_) {
        if (next_input_ == inputs_.size()) break;
        reader_ = std::make_unique<TextReader>(inputs_[next_input_++]);
      }
      if (!reader_->next(raw_)) {
        reader_.reset();
        continue;
      }
      ++read_;
      std::replace(raw_.begin(), raw_.end(), '\0', ' ');
      std::string_view cleaned = strip_whitespace(raw_);
      if (cleaned.empty()) continue;
      value_.assign(cleaned);
      ++documents_;
      return;
    }
    done_ = true;
  }

  const std::vector<fs::path>& inputs_;
  int64_t max_docs_;
  size_t next_input_ = 0;
  std::unique_ptr<TextReader> reader_;
  std::string raw_, value_;
  int64_t read_ = 0;       // documents read, empty ones included (what max_docs limits)
  int64_t documents_ = 0;  // documents handed to the trainer
  bool done_ = false;
  std::exception_ptr error_;
};

}  // namespace

TokenizerTrainSummary train_tokenizer(const TokenizerTrainOptions& o) {
  PG_CHECK(!o.inputs.empty(), "tokenizer train: no input file given");
  PG_CHECK(!o.out_prefix.empty(), "tokenizer train: no output prefix given");
  PG_CHECK(o.vocab_size > 0 && o.vocab_size <= 65536,
           "tokenizer train: vocab size {} outside [1, 65536] (shards store ids as uint16)", o.vocab_size);
  for (auto& f : o.inputs) PG_CHECK(fs::is_regular_file(f), "tokenizer train: input {} does not exist", f.string());
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"normalization_rule_name", "nmt_nfkc"},
      {"add_dummy_prefix", "false"},
      {"character_coverage", "0.999"},
      {"hard_vocab_limit", "false"},
      {"pad_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"unk_id", "3"},
      {"max_sentence_length", std::to_string(o.max_sentence_length)},
      {"num_threads", std::to_string(threads)},
      {"minloglevel", o.verbose ? "0" : "1"},
  };
  if (o.input_sentence_size > 0) {
    args["input_sentence_size"] = std::to_string(o.input_sentence_size);
    args["shuffle_input_sentence"] = "true";
  }

  const auto t0 = std::chrono::steady_clock::now();
  DocumentIterator docs(o.inputs, o.max_docs);
  std::string model_proto;
  auto status = sentencepiece::SentencePieceTrainer::Train(args, &docs, &model_proto);
  if (docs.error()) std::rethrow_exception(docs.error());
  PG_CHECK(status.ok(), "SentencePiece training ({} documents, vocab {}) failed: {}", docs.documents(),
           o.vocab_size, status.ToString());

  TokenizerTrainSummary s;
  s.documents = docs.documents();
  s.model_path = o.out_prefix;
  s.model_path += ".model";
  s.vocab_path = o.out_prefix;
  s.vocab_path += ".vocab";
  write_file_atomic(s.model_path, {reinterpret_cast<const uint8_t*>(model_proto.data()), model_proto.size()});

  // Reload what was written: this verifies the file and gives the pieces for the vocabulary listing.
  Tokenizer tok(s.model_path);
  std::string vocab;
  for (int id = 0; id < tok.vocab_size(); ++id) fmt::format_to(std::back_inserter(vocab), "{}\t{}\n", tok.piece(id), tok.score(id));
  write_text_file_atomic(s.vocab_path, vocab);
  s.pieces = tok.vocab_size();
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

}  // namespace pgolf
