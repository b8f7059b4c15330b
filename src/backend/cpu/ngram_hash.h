// Table indices of the n-gram embeddings (SPEC §3.9). Position 0 of every row (the references'
// sequence or eval window) has no predecessor inside the row and gets the rule's start value, even
// when a real predecessor exists in the token stream.
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// BigramHash v1: idx_0 = buckets−1 (reserved); idx_t = ((36313·tok_t) XOR (27191·tok_{t−1})) mod (buckets−1),
// int32 arithmetic as the references (products wrap), non-negative modulo.
void bigram_hash_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int buckets, int32_t* out);

// TrigramHash on the same table: positions 0 and 1 get buckets−1; for t ≥ 2
// ((36313·tok_t) XOR (27191·tok_{t−1}) XOR (51497·tok_{t−2})) mod (buckets−1).
void trigram_hash_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int buckets, int32_t* out);

// s600 direct bigram table: idx_t = (prev·vocab + tok_t) mod table_size, prev = 0 at position 0.
void direct_bigram_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int vocab, int table_size, int32_t* out);

}  // namespace pgolf::cpu
