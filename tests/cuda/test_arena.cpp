#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "backend/cuda/arena.h"
#include "core/error.h"
#include "cuda_test_util.h"

namespace pgolf::test {
namespace {

using cuda::Arena;
using cuda::DeviceBuffer;

class ArenaTest : public CudaTest {};

TEST_F(ArenaTest, RegionsAreAlignedDisjointAndUsable) {
  Arena arena(1 << 20, 256);
  char* a = static_cast<char*>(arena.allocate(1000, "a"));
  float* b = arena.allocate<float>(300, "b");
  char* c = static_cast<char*>(arena.allocate(1, "c"));
  EXPECT_EQ(a, arena.base());
  for (const void* p : {static_cast<const void*>(a), static_cast<const void*>(b), static_cast<const void*>(c)})
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
  EXPECT_EQ(reinterpret_cast<char*>(b) - a, 1024);  // 1000 rounded up to the alignment
  EXPECT_EQ(c - reinterpret_cast<char*>(b), 1280);  // 1200 bytes rounded up
  ASSERT_EQ(arena.regions().size(), 3u);
  EXPECT_EQ(arena.regions()[1].name, "b");
  EXPECT_EQ(arena.regions()[1].offset, 1024u);
  EXPECT_EQ(arena.regions()[1].bytes, 1200u);
  EXPECT_EQ(arena.used(), 1024u + 1280u + 1u);

  // Each region keeps its own contents.
  PG_CUDA_CHECK(cudaMemset(a, 0x11, 1000));
  PG_CUDA_CHECK(cudaMemset(b, 0x22, 1200));
  PG_CUDA_CHECK(cudaMemset(c, 0x33, 1));
  std::string host(1024 + 1200, '\0');
  PG_CUDA_CHECK(cudaMemcpy(host.data(), a, host.size(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(host.substr(0, 1000), std::string(1000, '\x11'));
  EXPECT_EQ(host.substr(1024, 1200), std::string(1200, '\x22'));

  const size_t used = arena.used();
  arena.reset();
  EXPECT_EQ(arena.used(), 0u);
  EXPECT_TRUE(arena.regions().empty());
  EXPECT_EQ(arena.high_water(), used);
  EXPECT_EQ(arena.allocate(16, "again"), arena.base());
}

TEST_F(ArenaTest, FullArenaNamesTheRegionAndSizes) {
  Arena arena(4096, 256);
  arena.allocate(4000, "activations");
  try {
    arena.allocate(200, "logits");
    FAIL() << "allocation past the capacity succeeded";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("arena full"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'logits'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("200 bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("4096 bytes"), std::string::npos) << msg;
  }
  EXPECT_EQ(arena.regions().size(), 1u);  // the failed request left no region behind
}

TEST_F(ArenaTest, OutOfDeviceMemoryReportsRequestedFreeAndTotal) {
  const size_t too_much = size_t{1} << 50;  // 1 PiB: no GPU has it; cudaMalloc refuses without side effects
  try {
    Arena arena(too_much);
    FAIL() << "a 1 PiB arena was allocated";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("out of device memory"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::to_string(too_much) + " bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("free of"), std::string::npos) << msg;
  }
  // The device is still usable afterwards.
  DeviceBuffer<int> ok(16);
  ok.fill_bytes(0);
  EXPECT_EQ(ok.download(), std::vector<int>(16, 0));
}

TEST_F(ArenaTest, DeviceBufferRoundTripAndMove) {
  std::vector<int> values(1000);
  for (int i = 0; i < 1000; ++i) values[i] = i * 7 - 300;
  DeviceBuffer<int> a(values);
  EXPECT_EQ(a.size(), 1000u);
  EXPECT_EQ(a.bytes(), 4000u);
  DeviceBuffer<int> b = std::move(a);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.download(), values);
  EXPECT_THROW(b.upload(std::vector<int>(3)), Error);
}

}  // namespace
}  // namespace pgolf::test
