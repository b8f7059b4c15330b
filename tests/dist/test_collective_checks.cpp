// check_collectives on the host communicators (what NCCL must also pass on the GPU), and proof that
// it catches a communicator that gets a collective wrong.
#include <gtest/gtest.h>

#include <cstring>
#include <mutex>

#include "dist/collective_checks.h"

using namespace pgolf;

TEST(CollectiveChecks, ThreadGroupsOfOneToFourRanksPass) {
  for (int world : {1, 2, 3, 4}) {
    std::mutex mu;
    std::vector<std::string> failures;
    run_thread_group(world, [&](Communicator& comm) {
      auto space = make_host_buffer_space();
      for (size_t count : {size_t{1}, size_t{37}, size_t{1000}}) {
        const auto f = check_collectives(comm, *space, count);
        std::lock_guard<std::mutex> lk(mu);
        failures.insert(failures.end(), f.begin(), f.end());
      }
    });
    EXPECT_TRUE(failures.empty()) << "world " << world << ": " << failures.front();
  }
}

TEST(CollectiveChecks, SingleProcessCommunicatorPasses) {
  auto comm = make_single_process_communicator();
  auto space = make_host_buffer_space();
  const auto failures = check_collectives(*comm, *space, 37);
  EXPECT_TRUE(failures.empty()) << failures.front();
}

namespace {

// Forwards to a correct communicator but gathers the blocks in the wrong order, and counts tickets
// from the wrong place: the checks must notice both.
class MisorderingCommunicator final : public Communicator {
 public:
  explicit MisorderingCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  void all_reduce(void* d, size_t n, DType t, ReduceOp op) override { inner_.all_reduce(d, n, t, op); }
  void reduce_scatter(const void* in, void* out, size_t n, DType t, ReduceOp op) override {
    inner_.reduce_scatter(in, out, n, t, op);
  }
  void all_gather(const void* in, void* out, size_t n, DType t) override {
    inner_.all_gather(in, out, n, t);
    const size_t block = n * dtype_size(t);
    std::vector<uint8_t> first(static_cast<uint8_t*>(out), static_cast<uint8_t*>(out) + block);
    std::memmove(out, static_cast<uint8_t*>(out) + block, block);  // blocks 0 and 1 swapped
    std::memcpy(static_cast<uint8_t*>(out) + block, first.data(), block);
  }
  void broadcast(void* d, size_t n, DType t, int root) override { inner_.broadcast(d, n, t, root); }
  void barrier() override { inner_.barrier(); }
  void all_reduce_host(double* d, size_t n, ReduceOp op) override { inner_.all_reduce_host(d, n, op); }
  int64_t fetch_add(int64_t inc) override { return inner_.fetch_add(inc) + 1; }
  void reset_counter(int64_t v) override { inner_.reset_counter(v); }

 private:
  Communicator& inner_;
};

}  // namespace

TEST(CollectiveChecks, CatchAWrongCommunicator) {
  std::mutex mu;
  std::vector<std::string> failures;
  run_thread_group(2, [&](Communicator& comm) {
    MisorderingCommunicator wrong(comm);
    auto space = make_host_buffer_space();
    const auto f = check_collectives(wrong, *space, 5);
    std::lock_guard<std::mutex> lk(mu);
    failures.insert(failures.end(), f.begin(), f.end());
  });
  auto count_of = [&](const std::string& part) {
    return std::count_if(failures.begin(), failures.end(),
                         [&](const std::string& f) { return f.find(part) != std::string::npos; });
  };
  EXPECT_EQ(count_of("all_gather F32: element 0 is"), 2);  // both ranks, every dtype
  EXPECT_EQ(count_of("all_gather I64: element 0 is"), 2);
  EXPECT_EQ(count_of("fetch_add tickets are not 1000..1005 each once"), 2);
  EXPECT_EQ(count_of("after reset_counter(7), fetch_add(0) = 8"), 2);
  EXPECT_EQ(count_of("all_reduce"), 0);
  EXPECT_EQ(count_of("broadcast"), 0);
}
