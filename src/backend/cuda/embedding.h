// Embedding lookups on the device (twin of cpu/embedding.h): gathers from bf16 tables, with the sums
// the model's input path needs formed in fp32 before the one rounding to bf16, and the backward
// scatter-add into an fp32 table gradient.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pgolf::cuda {

// Optional terms added to table[ids[i]] (each absent when its pointer is null):
//   table2[ids2[i]]            (TrigramHash on the bigram table; s600's direct bigram table)
//   scale · dense[i]           (the projected BigramHash output; scale is a device scalar)
struct EmbeddingAddends {
  const int32_t* ids2 = nullptr;
  const __nv_bfloat16* table2 = nullptr;
  const __nv_bfloat16* dense = nullptr;
  const float* dense_scale = nullptr;
};

// out[i, :] = table[ids[i], :] (+ addends) for i < n; rows of `dim` bf16 (dim a multiple of 8).
// Ids are not range-checked here: the host validates batches and the hashes are in range by construction.
void embedding_forward(const int32_t* ids, const __nv_bfloat16* table, int64_t n, int dim, __nv_bfloat16* out,
                       const EmbeddingAddends& addends, cudaStream_t stream);

// dtable[ids[i], :] += dout[i, :] (fp32 atomics: repeated ids sum in an unspecified order, so the last
// bits may differ between runs).
// dtable[ids[i]] += dout[i] with fp32 atomics (the order of the sums, and so their last bits, vary).
void embedding_backward(const int32_t* ids, int64_t n, const float* dout, int dim, float* dtable, cudaStream_t stream);

// The same sums in a fixed order: the ids are sorted (stable radix sort, so equal ids keep their token
// order) and each table row's tokens are added in token order — the same bits on every run. ids in
// [0, table_rows); the workspace holds embedding_sort_workspace_bytes(n) bytes (device, 256-aligned).
size_t embedding_sort_workspace_bytes(int64_t max_n);
void embedding_backward_sorted(const int32_t* ids, int64_t n, const float* dout, int dim, float* dtable,
                               int table_rows, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace pgolf::cuda
