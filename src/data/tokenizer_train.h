// Training a SentencePiece BPE tokenizer with the challenge's trainer settings (SPEC 2.1):
// byte_fallback, split_digits, nmt_nfkc normalization, no dummy prefix, character coverage 0.999,
// a soft vocabulary limit, ids pad 0 / bos 1 / eos 2 / unk 3.
#pragma once

#include <cstdint>
#include <vector>

#include "core/fs.h"

namespace pgolf {

struct TokenizerTrainOptions {
  std::vector<fs::path> inputs;      // JSONL(.zst) or plain text (see text_reader.h), read in order
  fs::path out_prefix;               // writes out_prefix.model and out_prefix.vocab
  int64_t vocab_size = 1024;
  int64_t max_docs = 0;              // > 0: only the first max_docs documents, empty ones included (tokenizer_train_docs)
  int64_t input_sentence_size = 0;   // > 0: SentencePiece keeps a uniform random sample of this many documents
  int64_t max_sentence_length = 4192;  // bytes; longer documents are skipped (SentencePiece's default, as the reference)
  int threads = 0;                   // trainer threads; 0 = every core
  bool verbose = false;              // SentencePiece's own progress log on stderr
};

struct TokenizerTrainSummary {
  int64_t documents = 0;  // documents handed to the trainer (after cleaning, empty ones dropped)
  int64_t pieces = 0;     // vocabulary size of the trained model
  double seconds = 0.0;
  fs::path model_path, vocab_path;
};

// Streams the documents (NUL -> space, stripped as Python's str.strip(), empty ones dropped — as the
// reference's sentence iterator does) to SentencePiece's trainer, then writes the model and a
// `piece<TAB>score` vocabulary file atomically and reloads the model to verify it.
TokenizerTrainSummary train_tokenizer(const TokenizerTrainOptions& options);

}  // namespace pgolf
