// A check of a Communicator against values known exactly: every collective on every dtype it takes,
// run by every rank. The thread communicator runs it in CI, NCCL on the GPU tests and in
// `pgolf dist-selftest` across processes; all of them must return no mismatch.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "dist/communicator.h"

namespace pgolf {

// Where a communicator's buffers live, for code that fills and reads them from the host: host
// memory for the CPU communicators, device memory for NCCL.
class BufferSpace {
 public:
  virtual ~BufferSpace() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  // Waits for the collectives enqueued before, then copies.
  virtual void download(void* dst, const void* src, size_t bytes) = 0;
};

std::unique_ptr<BufferSpace> make_host_buffer_space();

// All-reduce (Sum, Max; Avg on floating types), reduce-scatter, all-gather and broadcast of `count`
// elements per rank in F32, F64, BF16, I32 and I64; all_reduce_host; barrier; the shared counter
// (tickets unique across ranks, reset). The values are small integers (and binary fractions), so
// sums and maxima are exact in every dtype; averages may round (NCCL scales each term by 1/world
// in the element type) and are compared within (2·world + 1) unit roundoffs of Σ|terms| / world.
// Returns one line per mismatch (at most three per check); empty when all agree.
std::vector<std::string> check_collectives(Communicator& comm, BufferSpace& space, size_t count);

}  // namespace pgolf
