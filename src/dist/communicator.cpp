#include "dist/communicator.h"

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "core/half.h"

namespace pgolf {

namespace {

// Reduces `n` elements from `srcs` (one pointer per rank, in rank order) into `dst`.
void reduce_into(void* dst, const std::vector<const void*>& srcs, size_t offset, size_t n, DType dtype,
                 ReduceOp op) {
  const double inv = 1.0 / static_cast<double>(srcs.size());
  auto combine = [&](auto load, auto store) {
    for (size_t i = 0; i < n; ++i) {
      double acc = load(srcs[0], offset + i);
      for (size_t r = 1; r < srcs.size(); ++r) {
        double v = load(srcs[r], offset + i);
        acc = op == ReduceOp::Max ? std::max(acc, v) : acc + v;
      }
      if (op == ReduceOp::Avg) acc *= inv;
      store(dst, i, acc);
    }
  };
  switch (dtype) {
    case DType::F32:
      combine([](const void* p, size_t i) { return static_cast<double>(static_cast<const float*>(p)[i]); },
              [](void* p, size_t i, double v) { static_cast<float*>(p)[i] = static_cast<float>(v); });
      break;
    case DType::F64:
      combine([](const void* p, size_t i) { return static_cast<const double*>(p)[i]; },
              [](void* p, size_t i, double v) { static_cast<double*>(p)[i] = v; });
      break;
    case DType::BF16:
      combine([](const void* p, size_t i) { return static_cast<double>(bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i])); },
              [](void* p, size_t i, double v) { static_cast<uint16_t*>(p)[i] = f32_to_bf16_bits(static_cast<float>(v)); });
      break;
    case DType::I32:
    case DType::I64: {
      PG_CHECK(op != ReduceOp::Avg, "integer all-reduce does not support Avg");
      for (size_t i = 0; i < n; ++i) {
        int64_t acc = 0;
        for (size_t r = 0; r < srcs.size(); ++r) {
          int64_t v = dtype == DType::I32 ? static_cast<const int32_t*>(srcs[r])[offset + i]
                                          : static_cast<const int64_t*>(srcs[r])[offset + i];
          acc = (r == 0) ? v : (op == ReduceOp::Max ? std::max(acc, v) : acc + v);
        }
        if (dtype == DType::I32) static_cast<int32_t*>(dst)[i] = static_cast<int32_t>(acc);
        else static_cast<int64_t*>(dst)[i] = acc;
      }
      break;
    }
    default: fail("collectives do not support dtype {}", dtype_name(dtype));
  }
}

class SingleProcessCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void all_reduce(void*, size_t, DType, ReduceOp) override {}
  void reduce_scatter(const void* in, void* out, size_t n, DType dtype, ReduceOp) override {
    if (in != out) std::memmove(out, in, n * dtype_size(dtype));
  }
  void all_gather(const void* in, void* out, size_t n, DType dtype) override {
    if (in != out) std::memmove(out, in, n * dtype_size(dtype));
  }
  void broadcast(void*, size_t, DType, int root) override {
    PG_CHECK(root == 0, "broadcast root {} out of range for world size 1", root);
  }
  void barrier() override {}
  void all_reduce_host(double*, size_t, ReduceOp) override {}
  int64_t fetch_add(int64_t inc) override {
    int64_t v = counter_;
    counter_ += inc;
    return v;
  }
  void reset_counter(int64_t value) override { counter_ = value; }

 private:
  int64_t counter_ = 0;
};

struct AbortedError : Error {
  AbortedError() : Error("another rank failed; collective aborted") {}
};

// State shared by the threads of one group.
struct ThreadShared {
  explicit ThreadShared(int n) : world(n), slots(n), out_slots(n) {}
  int world;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  bool aborted = false;
  std::vector<const void*> slots;  // each rank's input buffer for the current collective
  std::vector<void*> out_slots;
  std::atomic<int64_t> counter{0};

  void wait_all() {
    std::unique_lock<std::mutex> lk(mu);
    if (aborted) throw AbortedError();
    uint64_t gen = generation;
    if (++arrived == world) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait(lk, [&] { return generation != gen || aborted; });
    if (aborted) throw AbortedError();
  }
  void abort() {
    std::lock_guard<std::mutex> lk(mu);
    aborted = true;
    cv.notify_all();
  }
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(ThreadShared& s, int rank) : s_(s), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return s_.world; }

  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    std::vector<uint8_t> result(count * dtype_size(dtype));
    s_.slots[rank_] = data;
    s_.wait_all();
    reduce_into(result.data(), s_.slots, 0, count, dtype, op);
    s_.wait_all();  // everyone has read every input before anyone overwrites its own
    std::memcpy(data, result.data(), result.size());
  }
  void reduce_scatter(const void* in, void* out, size_t n, DType dtype, ReduceOp op) override {
    std::vector<uint8_t> result(n * dtype_size(dtype));
    s_.slots[rank_] = in;
    s_.wait_all();
    reduce_into(result.data(), s_.slots, static_cast<size_t>(rank_) * n, n, dtype, op);
    s_.wait_all();
    std::memcpy(out, result.data(), result.size());
  }
  void all_gather(const void* in, void* out, size_t n, DType dtype) override {
    const size_t bytes = n * dtype_size(dtype);
    std::vector<uint8_t> mine(static_cast<const uint8_t*>(in), static_cast<const uint8_t*>(in) + bytes);
    s_.slots[rank_] = mine.data();
    s_.wait_all();
    for (int r = 0; r < s_.world; ++r)
      std::memcpy(static_cast<uint8_t*>(out) + static_cast<size_t>(r) * bytes, s_.slots[r], bytes);
    s_.wait_all();
  }
  void broadcast(void* data, size_t count, DType dtype, int root) override {
    PG_CHECK(root >= 0 && root < s_.world, "broadcast root {} out of range for world size {}", root, s_.world);
    s_.slots[rank_] = data;
    s_.wait_all();
    if (rank_ != root) std::memcpy(data, s_.slots[root], count * dtype_size(dtype));
    s_.wait_all();
  }
  void barrier() override { s_.wait_all(); }
  void all_reduce_host(double* data, size_t count, ReduceOp op) override {
    all_reduce(data, count, DType::F64, op);
  }
  int64_t fetch_add(int64_t inc) override { return s_.counter.fetch_add(inc); }
  void reset_counter(int64_t value) override {
    s_.wait_all();
    if (rank_ == 0) s_.counter.store(value);
    s_.wait_all();
  }

 private:
  ThreadShared& s_;
  int rank_;
};

}  // namespace

std::unique_ptr<Communicator> make_single_process_communicator() {
  return std::make_unique<SingleProcessCommunicator>();
}

void run_thread_group(int world_size, const std::function<void(Communicator&)>& fn) {
  PG_CHECK(world_size >= 1, "thread group needs at least one rank, got {}", world_size);
  ThreadShared shared(world_size);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_size));
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      ThreadCommunicator comm(shared, r);
      try {
        fn(comm);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
        shared.abort();
      }
    });
  }
  for (auto& t : threads) t.join();
  // Prefer the original failure over the "aborted" errors it caused on other ranks.
  std::exception_ptr first_abort;
  for (auto& e : errors) {
    if (!e) continue;
    try {
      std::rethrow_exception(e);
    } catch (const AbortedError&) {
      if (!first_abort) first_abort = e;
    } catch (...) {
      std::rethrow_exception(e);
    }
  }
  if (first_abort) std::rethrow_exception(first_abort);
}

}  // namespace pgolf
