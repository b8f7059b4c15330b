// NcclCommunicator: the Communicator of GPU runs — one process per GPU, collectives on device
// buffers enqueued on the engine's CUDA stream (asynchronous, in order with its kernels). The
// operations that hand results to the host (all_reduce_host, barrier) wait for the stream, checking
// meanwhile for NCCL's asynchronous errors, for ranks that left the rendezvous store and for the
// PGOLF_DIST_TIMEOUT; any failure aborts the communicator (ncclCommAbort) and says why.
// Compiled only when CUDA and NCCL are found (PGOLF_HAVE_NCCL).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "dist/collective_checks.h"
#include "dist/communicator.h"
#include "dist/cuda_thread_communicator.h"  // make_device_buffer_space
#include "dist/rendezvous.h"

struct ncclComm;

namespace pgolf {

class NcclCommunicator final : public Communicator {
 public:
  // Every rank of the rendezvous calls it; rank 0 makes NCCL's unique id and shares it through the
  // store. This process's CUDA device must be set first (bind_local_gpu). `stream` is a
  // cudaStream_t (nullptr: the legacy default stream). The rendezvous must outlive the
  // communicator: it holds the shared counter.
  NcclCommunicator(Rendezvous& rendezvous, void* stream);
  // World size 1 without a store (single-GPU runs, tests): collectives are device copies.
  explicit NcclCommunicator(void* stream);
  // ncclCommDestroy after pending work; ncclCommAbort when destroyed during exception unwinding.
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }

  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override;
  void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, ReduceOp op) override;
  void all_gather(const void* in, void* out, size_t count_per_rank, DType dtype) override;
  void broadcast(void* data, size_t count, DType dtype, int root) override;
  void barrier() override;
  void all_reduce_host(double* data, size_t count, ReduceOp op) override;
  int64_t fetch_add(int64_t inc) override;
  void reset_counter(int64_t value) override;
  void set_stream(void* stream) override { stream_ = stream; }
  bool device_buffers() const override { return true; }

  void* stream() const { return stream_; }
  // Stops NCCL's work at once (failure paths); every later call fails.
  void abort();

 private:
  void init(const void* unique_id);
  void check(int result, const char* call);  // result: an ncclResult_t
  void check_usable() const;
  // Waits for the stream, failing on NCCL errors, departed ranks and the timeout.
  void wait_stream(const char* what);

  Rendezvous* rendezvous_ = nullptr;
  int rank_ = 0, world_ = 1;
  void* stream_ = nullptr;
  ncclComm* comm_ = nullptr;
  bool aborted_ = false;
  double timeout_s_;
  double* staging_device_ = nullptr;  // all_reduce_host goes through these
  double* staging_host_ = nullptr;    // (pinned, so the copy back does not block the host)
  int64_t local_counter_ = 0;         // the counter when there is no rendezvous
};

// Sets this process's CUDA device from its local rank, one GPU per local rank. With `allow_shared`,
// local ranks beyond the visible GPUs share them round-robin (NCCL itself refuses two ranks of one
// communicator on one GPU). Returns the device index.
int bind_local_gpu(int local_rank, bool allow_shared);

// The version of the NCCL library loaded, e.g. "2.28.9".
std::string nccl_version();

}  // namespace pgolf
