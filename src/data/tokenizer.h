// A SentencePiece model (libsentencepiece): encoding, special ids and the bpb byte tables.
// Every id comes from the model's own queries (SPEC 2.1): nothing is hard-coded.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/fs.h"
#include "data/bpb.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace pgolf {

class Tokenizer {
 public:
  // Loads a .model file; throws naming the file if it is missing or not a SentencePiece model.
  explicit Tokenizer(const fs::path& model_path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  const fs::path& path() const { return path_; }
  int64_t vocab_size() const;  // number of pieces
  // The BOS id that starts every document (the model must define one).
  int bos_id() const { return bos_id_; }

  // Ids of `text` (no BOS/EOS added). Safe to call from several threads at once.
  std::vector<int> encode(std::string_view text) const;

  const std::string& piece(int id) const;  // e.g. "▁the", "<0x0A>", "<s>"
  float score(int id) const;  // the piece's BPE merge score
  bool is_byte(int id) const;
  bool is_control(int id) const;

  // The bpb tables of SPEC 2.6 with size max(vocab_size(), table_size).
  ByteTables byte_tables(int64_t table_size = 0) const;

 private:
  fs::path path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int bos_id_ = -1;
};

}  // namespace pgolf
