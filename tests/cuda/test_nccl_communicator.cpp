// NcclCommunicator at world size 1 on the GPU: every collective in every dtype against the values it
// must give (dist/collective_checks.h), with and without a rendezvous store, and its errors. Several
// ranks are checked across processes by `pgolf dist-selftest --nproc N` (scripts/device-check.sh).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "core/error.h"
#include "cuda_test_util.h"

#ifdef PGOLF_HAVE_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace pgolf::test {
namespace {

#ifdef PGOLF_HAVE_NCCL

class NcclTest : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  void expect_all_collectives_pass(Communicator& comm) {
    const auto space = make_device_buffer_space(stream_);
    for (size_t count : {size_t{1}, size_t{4099}, size_t{1} << 20 | 1}) {
      const std::vector<std::string> failures = check_collectives(comm, *space, count);
      EXPECT_TRUE(failures.empty()) << failures.size() << " failures at " << count << " elements, first: "
                                    << failures.front();
    }
  }
  cudaStream_t stream_ = nullptr;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST_F(NcclTest, EveryCollectiveAndDtypeAtWorldSizeOne) {
  NcclCommunicator comm(stream_);
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.world_size(), 1);
  EXPECT_EQ(comm.stream(), stream_);
  expect_all_collectives_pass(comm);
}

// The unique id and the shared counter go through the rendezvous store.
TEST_F(NcclTest, EveryCollectiveThroughARendezvous) {
  Rendezvous rv(LaunchInfo{}, 60.0);
  NcclCommunicator comm(rv, stream_);
  expect_all_collectives_pass(comm);
  comm.reset_counter(3);
  EXPECT_EQ(comm.fetch_add(2), 3);
  EXPECT_EQ(rv.fetch_add(0), 5);  // one counter, the run's
}

TEST_F(NcclTest, HostValuesLargerThanTheStagingBuffer) {
  NcclCommunicator comm(stream_);
  std::vector<double> v(20000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.5 * static_cast<double>(i) - 7.0;
  const std::vector<double> expected = v;
  comm.all_reduce_host(v.data(), v.size(), ReduceOp::Avg);
  EXPECT_EQ(v, expected);
}

TEST_F(NcclTest, ErrorsNameTheProblem) {
  NcclCommunicator comm(stream_);
  cuda::DeviceBuffer<int32_t> ints(4, "ints");
  EXPECT_NE(error_of([&] { comm.all_reduce(ints.data(), 4, DType::I32, ReduceOp::Avg); })
                .find("integer all-reduce does not support Avg"),
            std::string::npos);
  EXPECT_NE(error_of([&] { comm.broadcast(ints.data(), 4, DType::I32, 1); })
                .find("broadcast root 1 out of range for world size 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { comm.all_reduce(ints.data(), 4, DType::U8, ReduceOp::Sum); })
                .find("NCCL collectives do not take dtype"),
            std::string::npos);
  comm.abort();
  EXPECT_NE(error_of([&] { comm.barrier(); }).find("rank 0: the NCCL communicator was aborted after an earlier error"),
            std::string::npos);
}

TEST_F(NcclTest, OneGpuPerLocalRankUnlessSharingIsAllowed) {
  const int gpus = cuda::device_count();
  EXPECT_EQ(bind_local_gpu(gpus - 1, false), gpus - 1);
  const std::string e = error_of([&] { bind_local_gpu(gpus, false); });
  EXPECT_NE(e.find("local rank " + std::to_string(gpus) + " needs GPU " + std::to_string(gpus) + ", but this machine "
                   "shows " + std::to_string(gpus) + " GPU(s)"),
            std::string::npos)
      << e;
  EXPECT_EQ(bind_local_gpu(gpus, true), 0);  // round-robin
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
}

#else

TEST(NcclTest, NotBuilt) { GTEST_SKIP() << "this build has no NCCL"; }

#endif

}  // namespace
}  // namespace pgolf::test
