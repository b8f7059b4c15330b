// The thread device communicator (dist/cuda_thread_communicator.h): several ranks on one GPU. Every
// collective and dtype against dist/collective_checks (the checks the NCCL self-test runs), and the
// stream semantics NCCL has: a collective waits for each rank's earlier stream work, and a rank may
// overwrite its buffers in stream order right after a collective without disturbing the others.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "cuda_test_util.h"
#include "dist/collective_checks.h"
#include "dist/cuda_thread_communicator.h"

namespace pgolf::test {
namespace {

class ThreadDeviceCommunicatorTest : public CudaTest {};

// A non-blocking stream of the calling rank, given to its communicator.
struct RankStream {
  explicit RankStream(Communicator& comm) {
    PG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    comm.set_stream(stream);
  }
  ~RankStream() {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  cudaStream_t stream = nullptr;
};

// Blocks `stream` for `ms` milliseconds (a host function in the stream), so that a rank reaches its
// collectives on the device long after the others.
void delay_stream(cudaStream_t stream, intptr_t ms) {
  PG_CUDA_CHECK(cudaLaunchHostFunc(
      stream, [](void* p) { std::this_thread::sleep_for(std::chrono::milliseconds(reinterpret_cast<intptr_t>(p))); },
      reinterpret_cast<void*>(ms)));
}

TEST_F(ThreadDeviceCommunicatorTest, EveryCollectiveAndDtypePassesTheChecks) {
  for (int world : {1, 2, 3, 4}) {
    SCOPED_TRACE(world);
    std::vector<std::vector<std::string>> failures(static_cast<size_t>(world));
    run_device_ranks(world, [&](Communicator& comm) {
      EXPECT_TRUE(comm.device_buffers());
      EXPECT_FALSE(comm.graph_capturable());
      RankStream s(comm);
      const auto space = make_device_buffer_space(s.stream);
      // 4099: several blocks of the reduction kernel and an odd tail.
      for (size_t count : {size_t{1}, size_t{4099}}) {
        std::vector<std::string> f = check_collectives(comm, *space, count);
        failures[static_cast<size_t>(comm.rank())].insert(failures[static_cast<size_t>(comm.rank())].end(), f.begin(),
                                                          f.end());
      }
    });
    for (const auto& f : failures) EXPECT_TRUE(f.empty()) << f.size() << " failures, first: " << f.front();
  }
}

// Rank 1's stream reaches the collectives 200 ms late; nobody synchronizes before them. The
// all-reduce must still see rank 1's values, and the all-gather must read every rank's input before
// that rank, right after the collective in its stream, overwrites it with NaNs (0xFF bytes).
TEST_F(ThreadDeviceCommunicatorTest, CollectivesFollowEachRanksStream) {
  constexpr int kWorld = 3;
  constexpr size_t kCount = 1000;
  std::vector<std::vector<float>> reduced(kWorld), gathered(kWorld);
  run_device_ranks(kWorld, [&](Communicator& comm) {
    RankStream s(comm);
    const int me = comm.rank();
    std::vector<float> mine(kCount);
    for (size_t i = 0; i < kCount; ++i) mine[i] = static_cast<float>((me + 1) * 1000 + static_cast<int>(i));
    cuda::DeviceBuffer<float> a(kCount, "all-reduce buffer"), in(kCount, "all-gather input"),
        out(kCount * kWorld, "all-gather output");
    float* host = nullptr;
    PG_CUDA_CHECK(cudaMallocHost(&host, kCount * sizeof(float)));
    std::copy(mine.begin(), mine.end(), host);
    if (me == 1) delay_stream(s.stream, 200);
    PG_CUDA_CHECK(cudaMemcpyAsync(a.data(), host, kCount * sizeof(float), cudaMemcpyHostToDevice, s.stream));
    PG_CUDA_CHECK(cudaMemcpyAsync(in.data(), host, kCount * sizeof(float), cudaMemcpyHostToDevice, s.stream));
    comm.all_reduce(a.data(), kCount, DType::F32, ReduceOp::Sum);
    comm.all_gather(in.data(), out.data(), kCount, DType::F32);
    PG_CUDA_CHECK(cudaMemsetAsync(in.data(), 0xFF, kCount * sizeof(float), s.stream));
    reduced[static_cast<size_t>(me)].resize(kCount);
    gathered[static_cast<size_t>(me)].resize(kCount * kWorld);
    PG_CUDA_CHECK(cudaMemcpyAsync(reduced[static_cast<size_t>(me)].data(), a.data(), kCount * sizeof(float),
                                  cudaMemcpyDeviceToHost, s.stream));
    PG_CUDA_CHECK(cudaMemcpyAsync(gathered[static_cast<size_t>(me)].data(), out.data(), kCount * kWorld * sizeof(float),
                                  cudaMemcpyDeviceToHost, s.stream));
    PG_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    PG_CUDA_CHECK(cudaFreeHost(host));
  });
  for (int r = 0; r < kWorld; ++r) {
    for (size_t i = 0; i < kCount; ++i) {
      // Σ_q (q + 1)·1000 + i over q = 0, 1, 2.
      ASSERT_EQ(reduced[r][i], static_cast<float>(6000 + 3 * static_cast<int>(i))) << "rank " << r << " element " << i;
      for (int q = 0; q < kWorld; ++q)
        ASSERT_EQ(gathered[r][q * kCount + i], static_cast<float>((q + 1) * 1000 + static_cast<int>(i)))
            << "rank " << r << " block " << q << " element " << i;
    }
  }
}

// An error on one rank stops the others' collectives and is the one reported.
TEST_F(ThreadDeviceCommunicatorTest, AFailingRankAbortsTheOthers) {
  try {
    run_device_ranks(2, [&](Communicator& comm) {
      RankStream s(comm);
      if (comm.rank() == 1) throw Error("rank 1 failed on purpose");
      cuda::DeviceBuffer<float> a(4, "buffer");
      comm.all_reduce(a.data(), 4, DType::F32, ReduceOp::Sum);
    });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "rank 1 failed on purpose");
  }
}

}  // namespace
}  // namespace pgolf::test
