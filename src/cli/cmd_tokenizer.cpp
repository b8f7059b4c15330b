// pgolf tokenizer train: a SentencePiece BPE tokenizer with the challenge's trainer settings.
#include <fmt/core.h>

#include "cli/commands.h"
#include "data/tokenizer_train.h"

namespace pgolf::cli {

void register_tokenizer(CLI::App& app) {
  auto* tok = app.add_subcommand("tokenizer", "SentencePiece tokenizers");
  tok->require_subcommand(1);
  auto* train = tok->add_subcommand(
      "train",
      "train a SentencePiece BPE tokenizer (byte fallback, split digits, nmt_nfkc, no dummy prefix, "
      "coverage 0.999, pad 0 / bos 1 / eos 2 / unk 3) from JSONL(.zst) or plain text files");
  static TokenizerTrainOptions opt;
  static std::string out_prefix;
  static std::vector<std::string> inputs;
  train->add_option("--out", out_prefix, "output prefix: writes PREFIX.model and PREFIX.vocab")->required();
  train->add_option("--vocab-size", opt.vocab_size, "vocabulary size (a soft limit, as the reference)")
      ->required()
      ->check(CLI::Range(int64_t{1}, int64_t{65536}));
  train->add_option("--max-docs", opt.max_docs, "use only the first N documents (0 = all)");
  train->add_option("--input-sentence-size", opt.input_sentence_size,
                    "keep a uniform random sample of N documents (SentencePiece sampling; 0 = all)");
  train->add_option("--max-sentence-length", opt.max_sentence_length,
                    "skip documents longer than this many bytes (SentencePiece's default, as the reference)")
      ->capture_default_str();
  train->add_option("--threads", opt.threads, "trainer threads (0 = every core)");
  train->add_flag("--verbose", opt.verbose, "show SentencePiece's training log");
  train->add_option("inputs", inputs, "JSONL(.zst) files with a \"text\" key per line, or plain text files")
      ->required();
  train->callback([] {
    opt.out_prefix = out_prefix;
    opt.inputs.assign(inputs.begin(), inputs.end());
    TokenizerTrainSummary s = train_tokenizer(opt);
    fmt::print("trained a {}-piece BPE tokenizer on {} documents in {:.1f} s\n  {}\n  {}\n", s.pieces, s.documents,
               s.seconds, s.model_path.string(), s.vocab_path.string());
  });
}

}  // namespace pgolf::cli
