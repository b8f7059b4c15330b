// Table indices of the n-gram embeddings on the device (twin of cpu/ngram_hash.h): int32 arithmetic
// with the references' wrap-around products and non-negative modulo; position 0 (and 1 for the
// trigram) of every batch row gets the rule's start value. ids, out [rows·seq_len] int32 (device).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

void bigram_hash_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int buckets, int32_t* out,
                         cudaStream_t stream);
void trigram_hash_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int buckets, int32_t* out,
                          cudaStream_t stream);
// s600: (prev·vocab + tok) mod table_size, prev = 0 at position 0.
void direct_bigram_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int vocab, int table_size, int32_t* out,
                           cudaStream_t stream);

}  // namespace pgolf::cuda
