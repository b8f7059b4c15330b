// NcclCommunicator at world size 1 on the GPU: every collective in every dtype against the values it
// must give (dist/collective_checks.h), with and without a rendezvous store, its errors, and the CUDA
// engine trained through it against the single-process engine. Several
// ranks are checked across processes by `pgolf dist-selftest --nproc N` (scripts/device-check.sh).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>

#include "backend/cuda/cuda_engine.h"
#include "core/error.h"
#include "cuda_test_util.h"
#include "model/cpu_model.h"
#include "model/init.h"
#include "model/tiny_models.h"
#include "test_util.h"
#include "tiny64.h"

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

// The CUDA engine through NCCL at world size 1 takes the path of a multi-process run (gradients
// all-reduced on the engine's stream, captured into the step's graph) and must give the single-process
// engine's bits: losses, gradient norms, weights and EMA after a few steps (deterministic mode).
TEST_F(NcclTest, EngineTrainingMatchesTheSingleProcessPath) {
  for (const std::string stack : {"s691", "s1560"}) {
    Config c = tiny64_preset(stack);
    c.set("grad_clip_norm", 0.3);
    CpuModel<float> init(ModelConfig::from_config(c));
    perturbed_init(init, 71);
    auto single = make_single_process_communicator();
    NcclCommunicator nccl(stream_);
    std::vector<std::vector<double>> losses(2);
    std::vector<ParamSet<float>> params, emas;
    int k = 0;
    for (Communicator* comm : {single.get(), static_cast<Communicator*>(&nccl)}) {
      cuda::CudaEngine e(c, *comm, cuda::CudaEngineOptions{160, true, true});
      e.load_params(init.params());
      e.set_looping(e.model_config().has_looping());
      e.init_ema();
      for (int s = 0; s < 3; ++s) {
        const Batch b = batch64(128, false, 80 + static_cast<uint64_t>(s));
        const StepResult r = e.train_step(std::span<const Batch>(&b, 1), {s, 1.0, 0.9, true});
        losses[static_cast<size_t>(k)].push_back(r.loss);
        losses[static_cast<size_t>(k)].push_back(r.grad_norm);
      }
      params.emplace_back(e.layout());
      emas.emplace_back(e.layout());
      e.store_params(params.back());
      e.store_ema(emas.back());
      ++k;
    }
    EXPECT_EQ(losses[1], losses[0]) << stack;
    EXPECT_TRUE(std::equal(params[0].all().begin(), params[0].all().end(), params[1].all().begin())) << stack;
    EXPECT_TRUE(std::equal(emas[0].all().begin(), emas[0].all().end(), emas[1].all().begin())) << stack;
  }
}

#else

TEST(NcclTest, NotBuilt) { GTEST_SKIP() << "this build has no NCCL"; }

#endif

}  // namespace
}  // namespace pgolf::test
