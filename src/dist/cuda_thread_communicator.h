// Several ranks on ONE GPU, for tests of the distributed GPU code (NCCL refuses two ranks of one
// communicator on one device): each rank is a thread with its own CUDA stream on the calling
// thread's device, and its collectives act on device buffers with NCCL's stream semantics — they
// are enqueued on the rank's stream (set_stream), the data is ready when that stream reaches them,
// and the host does not wait for the device (except in barrier(), as NCCL's).
//
// A collective publishes its buffer and a CUDA event on its stream through the host thread
// communicator (run_thread_group), makes its stream wait for every other rank's event, reads the
// other ranks' buffers directly (device-to-device copies; reductions by a kernel in rank order with
// the host communicator's arithmetic, backend/cuda/rank_reduce.h, so every rank gets the same bits)
// into its own scratch, then waits for every rank to have read its buffers before the result is
// copied into place. Simple and correct rather than fast. The ranks meet on the host while the
// collectives are enqueued, so they cannot be captured into CUDA graphs (graph_capturable() is false).
// Host values, the barrier and the shared counter are the host thread communicator's.
//
// Compiled only with CUDA.
#pragma once

#include <functional>
#include <memory>

#include "dist/collective_checks.h"
#include "dist/communicator.h"

namespace pgolf {

// Runs `fn(comm)` on `world_size` threads (at most 32), each with its rank of a thread device
// communicator on the calling thread's current device. Errors as run_thread_group: the first
// failure is rethrown after every thread has stopped.
void run_device_ranks(int world_size, const std::function<void(Communicator&)>& fn);

// Device memory for check_collectives; copies go on `stream` (a cudaStream_t) and wait for it.
std::unique_ptr<BufferSpace> make_device_buffer_space(void* stream);

}  // namespace pgolf
