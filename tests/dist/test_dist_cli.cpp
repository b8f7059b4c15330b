// The launcher and the rendezvous through the pgolf program: dist-selftest across processes, a
// failing rank, and the refusals of multi-process runs the CPU engine cannot make.
#include <gtest/gtest.h>

#include "dist_test_util.h"
#include "test_util.h"

using namespace pgolf;

namespace {
bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }
}  // namespace

TEST(DistCli, SelftestAcrossThreeProcesses) {
  const auto r = test::run_pgolf("dist-selftest --nproc 3 --store-only --timeout 60");
  ASSERT_EQ(r.status, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string p = "[rank " + std::to_string(rank) + "] ";
    EXPECT_TRUE(contains(r.output, p + "dist-selftest: rank " + std::to_string(rank) + " of 3, local rank " +
                                       std::to_string(rank) + " of 3, launcher torchrun"))
        << r.output;
    EXPECT_TRUE(contains(r.output, p + "store: ok (values of 3 ranks, barrier, 600 unique counter tickets)"))
        << r.output;
    EXPECT_TRUE(contains(r.output, p + "dist-selftest: rank " + std::to_string(rank) + " passed")) << r.output;
  }
}

TEST(DistCli, AFailingRankFailsTheRunAndStopsTheOthers) {
  const auto r = test::run_pgolf("dist-selftest --nproc 3 --store-only --timeout 60 --fail-rank 1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 1] pgolf: error: rank 1 fails on purpose (--fail-rank)")) << r.output;
  EXPECT_TRUE(contains(r.output, "exited with status 1; stopping the other ranks")) << r.output;
  EXPECT_FALSE(contains(r.output, "passed")) << r.output;
}

// Under a launcher (here torchrun's variables for one process) pgolf starts no processes itself.
TEST(DistCli, UnderALauncherNprocOnlyChecks) {
  test::ScopedEnv one({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "1"},
                       {"MASTER_ADDR", std::nullopt}, {"MASTER_PORT", std::nullopt}});
  const auto ok = test::run_pgolf("dist-selftest --store-only --timeout 60");
  EXPECT_EQ(ok.status, 0) << ok.output;
  EXPECT_TRUE(contains(ok.output, "dist-selftest: rank 0 of 1, local rank 0 of 1, launcher torchrun")) << ok.output;
  EXPECT_FALSE(contains(ok.output, "[rank 0]")) << ok.output;  // no launcher of ours in between
  const auto mismatch = test::run_pgolf("dist-selftest --store-only --nproc 2");
  EXPECT_NE(mismatch.status, 0);
  EXPECT_TRUE(contains(mismatch.output, "--nproc 2: torchrun started this process as one of 1 on this machine"))
      << mismatch.output;
}

// Every command with --nproc refuses several CPU-engine processes before starting any.
TEST(DistCli, CommandsRefuseSeveralCpuProcesses) {
  for (const std::string& command : {"train --preset tiny", "eval --preset tiny", "run --preset tiny",
                                     "bench --preset tiny"}) {
    const auto r = test::run_pgolf(command + " --device cpu --nproc 2");
    const std::string name = command.substr(0, command.find(' '));
    EXPECT_NE(r.status, 0) << command;
    EXPECT_TRUE(contains(r.output, "pgolf " + name + " --nproc 2: 2 processes, but the cpu engine runs in one "
                                   "process; multi-process runs need the CUDA engine (--device cuda) and NCCL"))
        << r.output;
    EXPECT_FALSE(contains(r.output, "[rank ")) << r.output;
  }
}

TEST(DistCli, TrainUnderALauncherRefusesTheCpuEngine) {
  test::ScopedEnv launched(
      {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}});
  const auto r = test::run_pgolf("train --preset tiny --device cpu");
  EXPECT_NE(r.status, 0);
  EXPECT_TRUE(contains(r.output, "pgolf train (torchrun started 2 processes): 2 processes, but the cpu engine runs "
                                 "in one process"))
      << r.output;
}
