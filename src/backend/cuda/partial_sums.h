// Deterministic reductions over token rows: a kernel writes one row of partial sums per block into
// a workspace [blocks, width]; finish_partial_sums adds the column sums, taken over the blocks in an
// order fixed by the sizes (strided slices of the blocks, then a fixed tree over the slices), into the
// destination arrays (parameter gradients). No atomics: the same inputs give the same bits on every run.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <initializer_list>

namespace pgolf::cuda {

struct ReduceWorkspace {
  float* data = nullptr;
  size_t floats = 0;
};

// `width` consecutive columns of the partial rows that go to dst[0, width) (+=); a null dst drops them.
struct SumTarget {
  float* dst = nullptr;
  int width = 0;
};

constexpr int kMaxSumTargets = 8;

// Throws unless the workspace holds blocks · width floats.
void check_reduce_workspace(const ReduceWorkspace& ws, int blocks, int width, const char* what);

// targets, in the order of their columns in each partial row; their widths must add up to the row's
// width (the stride between the blocks' partial rows): columns to skip are null targets.
void finish_partial_sums(const float* partials, int blocks, std::initializer_list<SumTarget> targets,
                         cudaStream_t stream);

}  // namespace pgolf::cuda
