// Embedding lookup (gather) and its backward (scatter-add into the table's gradient).
#pragma once

#include <cstdint>

namespace pgolf::cpu {

// out[i, :] (=|+=) table[ids[i], :] for i < N; every id must be in [0, rows) (checked).
template <typename T>
void embedding_forward(const int32_t* ids, int64_t N, const T* table, int64_t rows, int64_t dim, T* out,
                       bool accumulate = false);

// dtable[ids[i], :] += dout[i, :]. Repeated ids sum; the order of the sums is fixed (serial over i).
template <typename T>
void embedding_backward(const int32_t* ids, int64_t N, const T* dout, int64_t dim, T* dtable);

}  // namespace pgolf::cpu
