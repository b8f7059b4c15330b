#include "backend/cuda/check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/ngram_hash.h"

namespace pgolf::cuda {
namespace {

enum class Rule { kBigram, kTrigram, kDirect };

__device__ __forceinline__ int32_t mul_i32(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) * static_cast<uint32_t>(b));
}
__device__ __forceinline__ int32_t floor_mod(int32_t x, int32_t m) {
  const int32_t r = x % m;
  return r < 0 ? r + m : r;
}

template <Rule kRule>
__global__ void ngram_index_kernel(const int32_t* __restrict__ ids, int64_t n, int64_t seq_len, int32_t modulus,
                                   int32_t vocab, int32_t* __restrict__ out) {
  pdl_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i % seq_len;
    if constexpr (kRule == Rule::kBigram) {
      out[i] = t == 0 ? modulus : floor_mod(mul_i32(36313, ids[i]) ^ mul_i32(27191, ids[i - 1]), modulus);
    } else if constexpr (kRule == Rule::kTrigram) {
      out[i] = t < 2 ? modulus
                     : floor_mod(mul_i32(36313, ids[i]) ^ mul_i32(27191, ids[i - 1]) ^ mul_i32(51497, ids[i - 2]),
                                 modulus);
    } else {
      const int64_t prev = t == 0 ? 0 : ids[i - 1];
      out[i] = static_cast<int32_t>((prev * vocab + ids[i]) % modulus);
    }
  }
}

template <Rule kRule>
void launch(const int32_t* ids, int64_t rows, int64_t seq_len, int32_t modulus, int32_t vocab, int32_t* out,
            cudaStream_t stream) {
  const int64_t n = rows * seq_len;
  if (n == 0) return;
  const int threads = 256;
  launch_kernel(ngram_index_kernel<kRule>, item_blocks(n, threads), threads, 0, stream, ids, n, seq_len, modulus, vocab,
                out);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

void bigram_hash_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int buckets, int32_t* out,
                         cudaStream_t stream) {
  PG_CUDA_REQUIRE(buckets >= 2, "bigram hash needs at least 2 buckets");
  launch<Rule::kBigram>(ids, rows, seq_len, buckets - 1, 0, out, stream);
}

void trigram_hash_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int buckets, int32_t* out,
                          cudaStream_t stream) {
  PG_CUDA_REQUIRE(buckets >= 2, "trigram hash needs at least 2 buckets");
  launch<Rule::kTrigram>(ids, rows, seq_len, buckets - 1, 0, out, stream);
}

void direct_bigram_indices(const int32_t* ids, int64_t rows, int64_t seq_len, int vocab, int table_size, int32_t* out,
                           cudaStream_t stream) {
  PG_CUDA_REQUIRE(table_size >= 1, "direct bigram table needs at least one row");
  launch<Rule::kDirect>(ids, rows, seq_len, table_size, vocab, out, stream);
}

}  // namespace pgolf::cuda
