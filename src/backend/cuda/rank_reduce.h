// The reduction of the thread device communicator (dist/cuda_thread_communicator.h): every rank's
// buffer lives on the same device, and each rank reduces all of them itself, element by element in
// rank order, exactly as the host thread communicator does (dist/communicator.cpp): F32, F64 and
// BF16 in double (then rounded to the element type; BF16 through float), integers in int64, Avg as
// the sum times 1/world in double. Every rank therefore gets the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace pgolf::cuda {

constexpr int kMaxReduceRanks = 32;

enum class RankReduceType { F32, F64, BF16, I32, I64 };
enum class RankReduceOp { Sum, Avg, Max };

// The buffers of `ranks` ranks, in rank order (device pointers).
struct RankBuffers {
  const void* data[kMaxReduceRanks] = {};
  int ranks = 0;
};

// out[i] = reduction over r of inputs.data[r][offset + i], i < count, stream-ordered. Integer types
// take Sum and Max only.
void reduce_over_ranks(const RankBuffers& inputs, size_t offset, size_t count, void* out, RankReduceType type,
                       RankReduceOp op, cudaStream_t stream);

}  // namespace pgolf::cuda
