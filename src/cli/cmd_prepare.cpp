// pgolf prepare: text -> token shards in the challenge format, with progress and a summary.
#include <fmt/core.h>
#include <unistd.h>

#include "cli/commands.h"
#include "data/prepare.h"

namespace pgolf::cli {

namespace {

// 1234567 -> "1,234,567"
std::string grouped(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}

void print_counts(const std::string& label, const PrepareCounts& c, double seconds) {
  fmt::print("{}: {} documents, {} tokens, {:.1f} MB of text, {:.3f} bytes/token", label, grouped(c.documents),
             grouped(c.tokens), c.text_bytes / 1e6, c.tokens ? double(c.text_bytes) / double(c.tokens) : 0.0);
  if (c.heldout_documents) fmt::print(" ({} documents / {} tokens held out)", grouped(c.heldout_documents), grouped(c.heldout_tokens));
  if (seconds > 0)
    fmt::print("\n  {:.1f} s, {:.2f} MB/s of text, {:.0f} tokens/s", seconds, c.text_bytes / 1e6 / seconds,
               c.tokens / seconds);
  fmt::print("\n");
}

}  // namespace

void register_prepare(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "prepare", "tokenize JSONL(.zst) or plain text into shards of the challenge format ([BOS] + ids per document)");
  static PrepareOptions opt;
  static std::string tokenizer_path, out_dir;
  static std::vector<std::string> inputs;
  cmd->add_option("--tokenizer", tokenizer_path, "SentencePiece .model file")->required();
  cmd->add_option("--out", out_dir, "output directory (created if missing)")->required();
  cmd->add_option("--name", opt.name, "shard file prefix: DIR/NAME_000000.bin, ...")->capture_default_str();
  cmd->add_option("--shard-tokens", opt.shard_tokens, "tokens per shard")->capture_default_str();
  cmd->add_option("--heldout-docs", opt.heldout_docs,
                  "hold out N documents spread evenly over all inputs (every (total/N)-th) into "
                  "DIR/NAME_heldout_000000.bin, ...");
  cmd->add_option("--shuffle-seed", opt.shuffle_seed,
                  "write the training documents in a random order from this seed (keeps them all in memory)");
  cmd->add_option("--threads", opt.threads, "encoding threads (0 = every core)");
  cmd->add_option("inputs", inputs, "JSONL(.zst) files with a \"text\" key per line, or plain text files")
      ->required();
  cmd->callback([] {
    opt.out_dir = out_dir;
    opt.inputs.assign(inputs.begin(), inputs.end());
    Tokenizer tok(tokenizer_path);
    const bool tty = ::isatty(STDERR_FILENO);
    double last_print = -1.0;
    auto progress = [&](const PrepareProgress& p) {
      if (!tty || p.seconds - last_print < 0.5) return;
      last_print = p.seconds;
      fmt::print(stderr, "\r\033[K[{}/{}] {:3.0f}% of {} | {} docs | {} tokens | {:.1f} MB/s", p.input_index + 1,
                 opt.inputs.size(), 100.0 * p.input_fraction, opt.inputs[p.input_index].filename().string(),
                 grouped(p.done.documents), grouped(p.done.tokens), p.done.text_bytes / 1e6 / p.seconds);
    };
    PrepareSummary s = prepare_shards(opt, tok, progress);
    if (tty) fmt::print(stderr, "\r\033[K");
    fmt::print("tokenizer {} ({} pieces, BOS {})\n", tok.path().string(), tok.vocab_size(), tok.bos_id());
    for (auto& in : s.inputs) print_counts(in.path.filename().string(), in.counts, 0.0);
    print_counts("total", s.total, s.seconds);
    fmt::print("wrote {} training shards {}/{}_NNNNNN.bin", s.shards.size(), opt.out_dir.string(), opt.name);
    if (opt.shuffle_seed >= 0) fmt::print(" (documents shuffled, seed {})", opt.shuffle_seed);
    if (!s.heldout_shards.empty())
      fmt::print(" and {} held-out shards {}/{}_heldout_NNNNNN.bin\n  (glob the training shards as {}_[0-9]*.bin)",
                 s.heldout_shards.size(), opt.out_dir.string(), opt.name, opt.name);
    fmt::print("\n");
  });
}

}  // namespace pgolf::cli
