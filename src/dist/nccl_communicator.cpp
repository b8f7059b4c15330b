#include "dist/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <thread>

#include "backend/cuda/check.h"
#include "core/error.h"

namespace pgolf {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kStagingDoubles = 8192;

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
    default: fail("NCCL collectives do not take dtype {}", dtype_name(t));
  }
}

ncclRedOp_t nccl_op(ReduceOp op, DType t, int world) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Avg:
      // As the host communicators: an integer average would truncate.
      PG_CHECK(t == DType::F32 || t == DType::F64 || t == DType::BF16, "integer all-reduce does not support Avg");
      // The average of one rank is its value: a sum, which NCCL does as a plain copy (no scaling pass).
      return world == 1 ? ncclSum : ncclAvg;
  }
  fail("unknown reduce op");
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

NcclCommunicator::NcclCommunicator(Rendezvous& rendezvous, void* stream)
    : rendezvous_(&rendezvous), rank_(rendezvous.rank()), world_(rendezvous.world_size()), stream_(stream),
      timeout_s_(rendezvous.store().timeout_s()) {
  const std::string key = rendezvous.next_key("pgolf/nccl_unique_id");
  ncclUniqueId id;
  if (rank_ == 0) {
    check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    rendezvous.store().set(key, std::string_view(id.internal, sizeof(id.internal)));
  } else {
    const std::string bytes = rendezvous.store().get(key);
    PG_CHECK(bytes.size() == sizeof(id.internal), "rank {}: NCCL unique id from the store has {} bytes, expected {}",
             rank_, bytes.size(), sizeof(id.internal));
    std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
  }
  init(&id);
}

NcclCommunicator::NcclCommunicator(void* stream) : stream_(stream), timeout_s_(dist_timeout_seconds()) {
  ncclUniqueId id;
  check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  init(&id);
}

void NcclCommunicator::init(const void* unique_id) {
  set_default_nccl_environment();  // before NCCL reads its environment
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, world_, *static_cast<const ncclUniqueId*>(unique_id), rank_);
  comm_ = comm;
  check(r, "ncclCommInitRank");
  try {
    PG_CUDA_CHECK(cudaMalloc(&staging_device_, kStagingDoubles * sizeof(double)));
    PG_CUDA_CHECK(cudaMallocHost(&staging_host_, kStagingDoubles * sizeof(double)));
  } catch (...) {
    abort();
    cudaFree(staging_device_);
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_) {
    if (std::uncaught_exceptions() > 0) ncclCommAbort(comm_);  // the other ranks may be gone
    else ncclCommDestroy(comm_);
  }
  cudaFree(staging_device_);
  cudaFreeHost(staging_host_);
}

void NcclCommunicator::abort() {
  if (comm_) ncclCommAbort(comm_);
  comm_ = nullptr;
  aborted_ = true;
}

void NcclCommunicator::check(int result, const char* call) {
  const auto r = static_cast<ncclResult_t>(result);
  if (r == ncclSuccess) return;
  const char* last = ncclGetLastError(comm_);
  const std::string detail = last && *last ? std::string(": ") + last : std::string();
  abort();
  fail("NCCL {} failed on rank {} of {}: {} (ncclResult_t {}){}; communicator aborted", call, rank_, world_,
       ncclGetErrorString(r), result, detail);
}

void NcclCommunicator::check_usable() const {
  PG_CHECK(!aborted_, "rank {}: the NCCL communicator was aborted after an earlier error", rank_);
}

void NcclCommunicator::all_reduce(void* data, size_t count, DType dtype, ReduceOp op) {
  check_usable();
  if (count == 0) return;
  check(ncclAllReduce(data, data, count, nccl_type(dtype), nccl_op(op, dtype, world_), comm_, as_stream(stream_)),
        "ncclAllReduce");
}

void NcclCommunicator::reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, ReduceOp op) {
  check_usable();
  if (count_per_rank == 0) return;
  check(ncclReduceScatter(in, out, count_per_rank, nccl_type(dtype), nccl_op(op, dtype, world_), comm_,
                          as_stream(stream_)),
        "ncclReduceScatter");
}

void NcclCommunicator::all_gather(const void* in, void* out, size_t count_per_rank, DType dtype) {
  check_usable();
  if (count_per_rank == 0) return;
  check(ncclAllGather(in, out, count_per_rank, nccl_type(dtype), comm_, as_stream(stream_)), "ncclAllGather");
}

void NcclCommunicator::broadcast(void* data, size_t count, DType dtype, int root) {
  check_usable();
  PG_CHECK(root >= 0 && root < world_, "broadcast root {} out of range for world size {}", root, world_);
  if (count == 0) return;
  check(ncclBroadcast(data, data, count, nccl_type(dtype), root, comm_, as_stream(stream_)), "ncclBroadcast");
}

void NcclCommunicator::barrier() {
  check_usable();
  check(ncclAllReduce(staging_device_, staging_device_, 1, ncclFloat64, ncclSum, comm_, as_stream(stream_)),
        "ncclAllReduce (barrier)");
  wait_stream("barrier");
}

void NcclCommunicator::all_reduce_host(double* data, size_t count, ReduceOp op) {
  check_usable();
  const cudaStream_t s = as_stream(stream_);
  for (size_t at = 0; at < count; at += kStagingDoubles) {
    const size_t n = std::min(kStagingDoubles, count - at);
    std::memcpy(staging_host_, data + at, n * sizeof(double));
    PG_CUDA_CHECK(cudaMemcpyAsync(staging_device_, staging_host_, n * sizeof(double), cudaMemcpyHostToDevice, s));
    check(ncclAllReduce(staging_device_, staging_device_, n, ncclFloat64, nccl_op(op, DType::F64, world_), comm_, s),
          "ncclAllReduce (host values)");
    PG_CUDA_CHECK(cudaMemcpyAsync(staging_host_, staging_device_, n * sizeof(double), cudaMemcpyDeviceToHost, s));
    wait_stream("all_reduce_host");
    std::memcpy(data + at, staging_host_, n * sizeof(double));
  }
}

int64_t NcclCommunicator::fetch_add(int64_t inc) {
  if (rendezvous_) return rendezvous_->fetch_add(inc);
  const int64_t v = local_counter_;
  local_counter_ += inc;
  return v;
}

void NcclCommunicator::reset_counter(int64_t value) {
  if (rendezvous_) rendezvous_->reset_counter(value);
  else local_counter_ = value;
}

void NcclCommunicator::wait_stream(const char* what) {
  const auto start = Clock::now();
  auto last_peer_check = start;
  while (true) {
    const cudaError_t e = cudaStreamQuery(as_stream(stream_));
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      abort();
      fail("rank {}: {}: CUDA error {} ({}); NCCL communicator aborted", rank_, what, static_cast<int>(e),
           cudaGetErrorString(e));
    }
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
    check(async, what);
    const auto now = Clock::now();
    if (rendezvous_ && now - last_peer_check > std::chrono::seconds(1)) {
      last_peer_check = now;
      try {
        rendezvous_->store().check_peers();
      } catch (const Error& err) {
        abort();
        fail("{}; NCCL communicator aborted during {}", err.what(), what);
      }
    }
    if (std::chrono::duration<double>(now - start).count() > timeout_s_) {
      abort();
      fail("rank {}: {} did not finish within {:g} s (PGOLF_DIST_TIMEOUT); NCCL communicator aborted", rank_, what,
           timeout_s_);
    }
    // Spin for the first 2 ms (a step's stop flag should not wait for a sleep), then poll gently.
    if (now - start < std::chrono::milliseconds(2)) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

int bind_local_gpu(int local_rank, bool allow_shared) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  PG_CHECK(e == cudaSuccess && count > 0, "local rank {}: no CUDA device is visible ({})", local_rank,
           e == cudaSuccess ? "device count 0" : cudaGetErrorString(e));
  int device = local_rank;
  if (local_rank >= count) {
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    PG_CHECK(allow_shared,
             "local rank {} needs GPU {}, but this machine shows {} GPU(s) (CUDA_VISIBLE_DEVICES={}): start at most "
             "{} process(es) per machine, one per GPU",
             local_rank, local_rank, count, visible ? visible : "unset", count);
    device = local_rank % count;
  }
  PG_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  return fmt::format("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
}

}  // namespace pgolf
