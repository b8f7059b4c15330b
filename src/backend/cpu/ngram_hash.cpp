#include "backend/cpu/ngram_hash.h"

#include "core/error.h"

namespace pgolf::cpu {

namespace {

// int32 multiply with two's-complement wrap (torch int32 tensors), computed without signed overflow.
int32_t mul_i32(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) * static_cast<uint32_t>(b));
}

// Python/torch `%` with a positive divisor: the result is in [0, m).
int32_t floor_mod(int32_t x, int32_t m) {
  int32_t r = x % m;
  return r < 0 ? r + m : r;
}

}  // namespace

void bigram_hash_indices(const int32_t* ids, int64_t rows, int64_t T, int buckets, int32_t* out) {
  PG_CHECK(buckets >= 2, "bigram hash needs at least 2 buckets, got {}", buckets);
  const int32_t mod = buckets - 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* t = ids + r * T;
    int32_t* o = out + r * T;
    o[0] = mod;
    for (int64_t i = 1; i < T; ++i) o[i] = floor_mod(mul_i32(36313, t[i]) ^ mul_i32(27191, t[i - 1]), mod);
  }
}

void trigram_hash_indices(const int32_t* ids, int64_t rows, int64_t T, int buckets, int32_t* out) {
  PG_CHECK(buckets >= 2, "trigram hash needs at least 2 buckets, got {}", buckets);
  const int32_t mod = buckets - 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* t = ids + r * T;
    int32_t* o = out + r * T;
    for (int64_t i = 0; i < T; ++i)
      o[i] = i < 2 ? mod
                   : floor_mod(mul_i32(36313, t[i]) ^ mul_i32(27191, t[i - 1]) ^ mul_i32(51497, t[i - 2]), mod);
  }
}

void direct_bigram_indices(const int32_t* ids, int64_t rows, int64_t T, int vocab, int table_size, int32_t* out) {
  PG_CHECK(table_size >= 1, "direct bigram table needs at least one row, got {}", table_size);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* t = ids + r * T;
    int32_t* o = out + r * T;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t prev = i == 0 ? 0 : t[i - 1];
      o[i] = static_cast<int32_t>((prev * vocab + t[i]) % table_size);
    }
  }
}

}  // namespace pgolf::cpu
