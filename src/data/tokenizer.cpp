#include "data/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>

#include "core/error.h"

namespace pgolf {

namespace {
constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581 '▁', SentencePiece's space
}

Tokenizer::Tokenizer(const fs::path& model_path)
    : path_(model_path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  PG_CHECK(fs::is_regular_file(model_path), "tokenizer model {} does not exist", model_path.string());
  auto status = sp_->Load(model_path.string());
  PG_CHECK(status.ok(), "cannot load SentencePiece model {}: {}", model_path.string(), status.ToString());
  bos_id_ = sp_->bos_id();
  PG_CHECK(bos_id_ >= 0 && bos_id_ < sp_->GetPieceSize(),
           "tokenizer {} defines no BOS piece (bos_id {}); documents are stored as [BOS] + ids",
           model_path.string(), bos_id_);
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int64_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

std::vector<int> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  auto status = sp_->Encode(text, &ids);
  PG_CHECK(status.ok(), "{}: cannot encode a text of {} bytes: {}", path_.string(), text.size(), status.ToString());
  return ids;
}

const std::string& Tokenizer::piece(int id) const {
  PG_CHECK(id >= 0 && id < vocab_size(), "{}: id {} outside [0, {})", path_.string(), id, vocab_size());
  return sp_->IdToPiece(id);
}

float Tokenizer::score(int id) const { return sp_->GetScore(id); }
bool Tokenizer::is_byte(int id) const { return sp_->IsByte(id); }
bool Tokenizer::is_control(int id) const { return sp_->IsControl(id); }

ByteTables Tokenizer::byte_tables(int64_t table_size) const {
  const int64_t sp_vocab = vocab_size();
  const size_t n = static_cast<size_t>(std::max(sp_vocab, table_size));
  ByteTables t;
  t.base_bytes.assign(n, 0);
  t.has_leading_space.assign(n, 0);
  t.is_boundary.assign(n, 1);  // ids >= sp_vocab (table padding) stay boundaries worth 0 bytes
  for (int id = 0; id < sp_vocab; ++id) {
    if (sp_->IsControl(id) || sp_->IsUnknown(id) || sp_->IsUnused(id)) continue;
    t.is_boundary[id] = 0;
    if (sp_->IsByte(id)) {
      t.base_bytes[id] = 1;
      continue;
    }
    std::string_view p = sp_->IdToPiece(id);
    if (p.starts_with(kSpaceMark)) {
      t.has_leading_space[id] = 1;
      p.remove_prefix(kSpaceMark.size());
    }
    t.base_bytes[id] = static_cast<int32_t>(p.size());
  }
  return t;
}

}  // namespace pgolf
