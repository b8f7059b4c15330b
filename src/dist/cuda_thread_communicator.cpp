#include "dist/cuda_thread_communicator.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

#include "backend/cuda/check.h"
#include "backend/cuda/rank_reduce.h"
#include "core/error.h"

namespace pgolf {

namespace {

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

cuda::RankReduceType reduce_type(DType t) {
  switch (t) {
    case DType::F32: return cuda::RankReduceType::F32;
    case DType::F64: return cuda::RankReduceType::F64;
    case DType::BF16: return cuda::RankReduceType::BF16;
    case DType::I32: return cuda::RankReduceType::I32;
    case DType::I64: return cuda::RankReduceType::I64;
    default: fail("collectives do not support dtype {}", dtype_name(t));
  }
}

cuda::RankReduceOp reduce_op(ReduceOp op, DType t) {
  PG_CHECK(op != ReduceOp::Avg || t == DType::F32 || t == DType::F64 || t == DType::BF16,
           "integer all-reduce does not support Avg");
  switch (op) {
    case ReduceOp::Sum: return cuda::RankReduceOp::Sum;
    case ReduceOp::Avg: return cuda::RankReduceOp::Avg;
    case ReduceOp::Max: return cuda::RankReduceOp::Max;
  }
  fail("unknown reduce op");
}

class DeviceBufferSpace final : public BufferSpace {
 public:
  explicit DeviceBufferSpace(void* stream) : stream_(as_stream(stream)) {}
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    PG_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
    return p;
  }
  void release(void* p) override { cudaFree(p); }
  // Copies on the collectives' stream, then waits for it: a plain cudaMemcpy from pageable memory
  // may return before its DMA lands, and a non-blocking stream does not wait for the legacy stream,
  // so a collective launched next could read a partly written input.
  void upload(void* dst, const void* src, size_t bytes) override {
    PG_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    PG_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void download(void* dst, const void* src, size_t bytes) override {
    PG_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    PG_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

 private:
  cudaStream_t stream_;
};

class ThreadDeviceCommunicator final : public Communicator {
 public:
  // `host`: this rank of the host thread communicator the ranks meet through.
  explicit ThreadDeviceCommunicator(Communicator& host) : host_(host) {
    PG_CHECK(host.world_size() <= cuda::kMaxReduceRanks, "the thread device communicator takes at most {} ranks, not {}",
             cuda::kMaxReduceRanks, host.world_size());
    PG_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    PG_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }
  ~ThreadDeviceCommunicator() override {
    cudaFree(scratch_);  // waits for the device (the stream set last may be gone by now)
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
  }
  ThreadDeviceCommunicator(const ThreadDeviceCommunicator&) = delete;
  ThreadDeviceCommunicator& operator=(const ThreadDeviceCommunicator&) = delete;

  int rank() const override { return host_.rank(); }
  int world_size() const override { return host_.world_size(); }
  void set_stream(void* stream) override { stream_ = stream; }
  bool device_buffers() const override { return true; }
  bool graph_capturable() const override { return false; }

  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    const cuda::RankReduceOp rop = reduce_op(op, dtype);
    const size_t bytes = count * dtype_size(dtype);
    const cuda::RankBuffers in = publish(data);
    reserve_scratch(bytes);
    cuda::reduce_over_ranks(in, 0, count, scratch_, reduce_type(dtype), rop, stream());
    wait_for_readers();
    copy(data, scratch_, bytes);
  }

  void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, ReduceOp op) override {
    const cuda::RankReduceOp rop = reduce_op(op, dtype);
    const size_t bytes = count_per_rank * dtype_size(dtype);
    const cuda::RankBuffers inputs = publish(in);
    reserve_scratch(bytes);
    cuda::reduce_over_ranks(inputs, static_cast<size_t>(rank()) * count_per_rank, count_per_rank, scratch_,
                            reduce_type(dtype), rop, stream());
    wait_for_readers();
    copy(out, scratch_, bytes);
  }

  void all_gather(const void* in, void* out, size_t count_per_rank, DType dtype) override {
    const size_t bytes = count_per_rank * dtype_size(dtype);
    const cuda::RankBuffers inputs = publish(in);
    reserve_scratch(bytes * static_cast<size_t>(world_size()));
    for (int r = 0; r < world_size(); ++r)
      copy(static_cast<uint8_t*>(scratch_) + static_cast<size_t>(r) * bytes, inputs.data[r], bytes);
    wait_for_readers();
    copy(out, scratch_, bytes * static_cast<size_t>(world_size()));
  }

  void broadcast(void* data, size_t count, DType dtype, int root) override {
    PG_CHECK(root >= 0 && root < world_size(), "broadcast root {} out of range for world size {}", root, world_size());
    const cuda::RankBuffers inputs = publish(data);
    // Only the root's buffer is read, and only the other ranks write theirs.
    if (rank() != root) copy(data, inputs.data[root], count * dtype_size(dtype));
    wait_for_readers();
  }

  // As NCCL's: the stream's work is done, then the ranks meet.
  void barrier() override {
    PG_CUDA_CHECK(cudaStreamSynchronize(stream()));
    host_.barrier();
  }
  void all_reduce_host(double* data, size_t count, ReduceOp op) override { host_.all_reduce_host(data, count, op); }
  int64_t fetch_add(int64_t inc) override { return host_.fetch_add(inc); }
  void reset_counter(int64_t value) override { host_.reset_counter(value); }

 private:
  cudaStream_t stream() const { return as_stream(stream_); }

  // Every rank's (buffer, event) pair, exchanged through the host communicator (which is also the
  // barrier that orders every record before every wait).
  std::vector<int64_t> exchange(const void* buffer, cudaEvent_t event) {
    const int64_t mine[2] = {static_cast<int64_t>(reinterpret_cast<uintptr_t>(buffer)),
                             static_cast<int64_t>(reinterpret_cast<uintptr_t>(event))};
    std::vector<int64_t> all(2 * static_cast<size_t>(world_size()));
    host_.all_gather(mine, all.data(), 2, DType::I64);
    return all;
  }
  static cudaEvent_t event_at(const std::vector<int64_t>& all, int r) {
    return reinterpret_cast<cudaEvent_t>(static_cast<uintptr_t>(all[2 * static_cast<size_t>(r) + 1]));
  }
  // This rank's stream reached the collective: publish its buffer; the stream then waits until every
  // rank's stream has reached it (their buffers hold the inputs). Returns every rank's buffer.
  cuda::RankBuffers publish(const void* buffer) {
    PG_CUDA_CHECK(cudaEventRecord(ready_, stream()));
    const std::vector<int64_t> all = exchange(buffer, ready_);
    cuda::RankBuffers b;
    b.ranks = world_size();
    for (int r = 0; r < world_size(); ++r) {
      b.data[r] = reinterpret_cast<const void*>(static_cast<uintptr_t>(all[2 * static_cast<size_t>(r)]));
      if (r != rank()) PG_CUDA_CHECK(cudaStreamWaitEvent(stream(), event_at(all, r), 0));
    }
    return b;
  }
  // This rank has enqueued its reads of the other ranks' buffers; its stream waits until every rank's
  // reads are done, so that what follows may overwrite its own buffers. (ready_ and done_ alternate:
  // a rank records either again only after every other rank has passed the wait on it.)
  void wait_for_readers() {
    PG_CUDA_CHECK(cudaEventRecord(done_, stream()));
    const std::vector<int64_t> all = exchange(nullptr, done_);
    for (int r = 0; r < world_size(); ++r)
      if (r != rank()) PG_CUDA_CHECK(cudaStreamWaitEvent(stream(), event_at(all, r), 0));
  }
  void copy(void* dst, const void* src, size_t bytes) {
    if (bytes > 0 && dst != src) PG_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
  }
  // Only this rank's stream uses the scratch, so it is replaced once that stream is idle.
  void reserve_scratch(size_t bytes) {
    if (bytes <= scratch_bytes_) return;
    PG_CUDA_CHECK(cudaStreamSynchronize(stream()));
    PG_CUDA_CHECK(cudaFree(scratch_));
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    PG_CUDA_CHECK(cudaMalloc(&scratch_, bytes));
    scratch_bytes_ = bytes;
  }

  Communicator& host_;
  void* stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
};

}  // namespace

void run_device_ranks(int world_size, const std::function<void(Communicator&)>& fn) {
  int device = 0;
  PG_CUDA_CHECK(cudaGetDevice(&device));
  run_thread_group(world_size, [&](Communicator& host) {
    PG_CUDA_CHECK(cudaSetDevice(device));  // the current device is per thread
    ThreadDeviceCommunicator comm(host);
    fn(comm);
  });
}

std::unique_ptr<BufferSpace> make_device_buffer_space(void* stream) {
  return std::make_unique<DeviceBufferSpace>(stream);
}

}  // namespace pgolf
