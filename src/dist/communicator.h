// Communicator: the collectives pgolf's distributed training and evaluation use. One process (or,
// for CPU tests, one thread) per rank. Buffers live where the backend keeps its tensors: host memory
// for the CPU communicators, device memory for NCCL (which enqueues on its stream). Collectives are
// called by every rank in the same order with the same sizes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "core/tensor.h"

namespace pgolf {

enum class ReduceOp { Sum, Avg, Max };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // In place over `count` elements of `dtype` (F32, F64, BF16, I32, I64).
  virtual void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) = 0;
  // `in` holds world_size blocks of `count_per_rank`; rank r receives the reduction of block r.
  virtual void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, ReduceOp op) = 0;
  // Every rank contributes `count_per_rank`; `out` receives world_size blocks in rank order.
  virtual void all_gather(const void* in, void* out, size_t count_per_rank, DType dtype) = 0;
  virtual void broadcast(void* data, size_t count, DType dtype, int root) = 0;
  virtual void barrier() = 0;

  // Host scalars (metrics, stop flags, evaluation sums): always host memory, whatever the backend.
  virtual void all_reduce_host(double* data, size_t count, ReduceOp op) = 0;

  // A counter shared by all ranks: returns the value before adding `inc` (work queues, e.g. LoRA-TTT
  // document batches handed out longest first). Not a collective: ranks call it independently.
  virtual int64_t fetch_add(int64_t inc) = 0;
  virtual void reset_counter(int64_t value) = 0;  // collective: every rank calls it

  // The CUDA stream (a cudaStream_t) device communicators enqueue their collectives on, in order
  // with the engine's kernels; host communicators have no stream and ignore it.
  virtual void set_stream(void* stream) {}
  // Whether the collectives act on device buffers (NCCL) rather than host memory.
  virtual bool device_buffers() const { return false; }
  // Whether the device collectives may be captured into a CUDA graph (NCCL's can). A communicator
  // that synchronises its ranks on the host while enqueueing (the thread device communicator) says
  // no, and the CUDA engine then launches its steps eagerly.
  virtual bool graph_capturable() const { return true; }

  template <typename T>
  void all_reduce(T* data, size_t count, ReduceOp op) {
    all_reduce(data, count, dtype_of<T>(), op);
  }
};

// World size 1: every collective is the identity (Avg of one value is the value).
std::unique_ptr<Communicator> make_single_process_communicator();

// Runs `fn(comm)` on `world_size` threads, each with its own rank of a shared-memory communicator
// over host buffers. Reductions are computed in rank order, in double for F32/F64/BF16, so every rank
// gets bit-identical results. An exception on any rank is rethrown (the first one) after all threads
// have stopped; a rank that throws aborts the collectives the others are blocked in.
void run_thread_group(int world_size, const std::function<void(Communicator&)>& fn);

}  // namespace pgolf
