#include <gtest/gtest.h>

#include <mutex>
#include <set>

#include "core/half.h"
#include "dist/communicator.h"

using namespace pgolf;

TEST(ThreadCommunicator, AllReduceSumAvgMax) {
  for (int world : {1, 2, 3, 4}) {
    run_thread_group(world, [&](Communicator& c) {
      std::vector<float> v = {static_cast<float>(c.rank() + 1), 10.0f * c.rank(), -1.0f};
      std::vector<float> s = v, a = v, m = v;
      c.all_reduce(s.data(), s.size(), ReduceOp::Sum);
      c.all_reduce(a.data(), a.size(), ReduceOp::Avg);
      c.all_reduce(m.data(), m.size(), ReduceOp::Max);
      const float n = static_cast<float>(world);
      EXPECT_FLOAT_EQ(s[0], n * (n + 1) / 2);
      EXPECT_FLOAT_EQ(s[1], 10.0f * n * (n - 1) / 2);
      EXPECT_FLOAT_EQ(s[2], -n);
      EXPECT_FLOAT_EQ(a[0], (n + 1) / 2);
      EXPECT_FLOAT_EQ(a[2], -1.0f);
      EXPECT_FLOAT_EQ(m[0], n);
      EXPECT_FLOAT_EQ(m[1], 10.0f * (n - 1));
    });
  }
}

TEST(ThreadCommunicator, ReductionsAreBitIdenticalOnEveryRank) {
  std::mutex mu;
  std::set<uint32_t> seen;
  run_thread_group(4, [&](Communicator& c) {
    std::vector<float> v(1000);
    for (size_t i = 0; i < v.size(); ++i) v[i] = 1.0f / static_cast<float>(i + 1 + 7 * c.rank());
    c.all_reduce(v.data(), v.size(), ReduceOp::Sum);
    uint32_t h = 0;
    for (float x : v) h = h * 31 + f32_bits(x);
    std::lock_guard<std::mutex> lk(mu);
    seen.insert(h);
  });
  EXPECT_EQ(seen.size(), 1u);
}

TEST(ThreadCommunicator, ReduceScatterAndAllGather) {
  run_thread_group(3, [](Communicator& c) {
    const int w = c.world_size();
    std::vector<double> in(static_cast<size_t>(2 * w));
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<double>(i) + 100.0 * c.rank();
    std::vector<double> out(2);
    c.reduce_scatter(in.data(), out.data(), 2, DType::F64, ReduceOp::Sum);
    // block r = elements [2r, 2r+2) summed over ranks: 3*(2r+k) + 100*(0+1+2)
    for (int k = 0; k < 2; ++k) EXPECT_DOUBLE_EQ(out[k], 3.0 * (2 * c.rank() + k) + 300.0);
    std::vector<double> all(static_cast<size_t>(2 * w));
    c.all_gather(out.data(), all.data(), 2, DType::F64);
    for (int r = 0; r < w; ++r)
      for (int k = 0; k < 2; ++k) EXPECT_DOUBLE_EQ(all[2 * r + k], 3.0 * (2 * r + k) + 300.0);
  });
}

TEST(ThreadCommunicator, BroadcastBarrierCounter) {
  run_thread_group(4, [](Communicator& c) {
    int32_t v[2] = {c.rank(), c.rank() * 2};
    c.broadcast(v, 2, DType::I32, 2);
    EXPECT_EQ(v[0], 2);
    EXPECT_EQ(v[1], 4);
    c.reset_counter(5);
    int64_t got = c.fetch_add(1);
    int64_t all[1] = {got};
    c.all_reduce(all, 1, DType::I64, ReduceOp::Sum);
    EXPECT_EQ(all[0], 5 + 6 + 7 + 8);  // each rank took a distinct ticket
  });
}

TEST(ThreadCommunicator, FailureOnOneRankReachesTheCaller) {
  EXPECT_THROW(run_thread_group(3,
                                [](Communicator& c) {
                                  if (c.rank() == 1) fail("rank 1 broke");
                                  c.barrier();
                                }),
               Error);
  try {
    run_thread_group(2, [](Communicator& c) {
      if (c.rank() == 0) fail("the original error");
      c.barrier();
    });
    FAIL() << "expected the error of rank 0";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "the original error");
  }
}

TEST(SingleProcessCommunicator, IsTheIdentity) {
  auto c = make_single_process_communicator();
  std::vector<float> v = {1.5f, -2.0f};
  c->all_reduce(v.data(), v.size(), ReduceOp::Avg);
  EXPECT_EQ(v, (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(c->fetch_add(3), 0);
  EXPECT_EQ(c->fetch_add(1), 3);
}
