// The launch environment of torchrun, Open MPI, PMI (MPICH / Intel MPI hydra, Cray) and Slurm's srun.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "core/error.h"
#include "dist/rendezvous.h"

using namespace pgolf;

namespace {

using Env = std::map<std::string, std::string>;

LaunchInfo parse(const Env& env) {
  return read_launch_env([&](const std::string& name) -> std::optional<std::string> {
    auto it = env.find(name);
    return it == env.end() ? std::nullopt : std::optional<std::string>(it->second);
  });
}

std::string error_of(const Env& env) {
  try {
    parse(env);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

const Env kMaster = {{"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"}};

Env with_master(Env env) {
  env.insert(kMaster.begin(), kMaster.end());
  return env;
}

}  // namespace

TEST(LaunchEnv, NothingSetIsOneProcess) {
  const LaunchInfo info = parse({});
  EXPECT_EQ(info.launcher, "none");
  EXPECT_EQ(info.rank, 0);
  EXPECT_EQ(info.world_size, 1);
  EXPECT_FALSE(info.multi_process());
}

TEST(LaunchEnv, Torchrun) {
  const LaunchInfo info =
      parse(with_master({{"RANK", "11"}, {"WORLD_SIZE", "16"}, {"LOCAL_RANK", "3"}, {"LOCAL_WORLD_SIZE", "8"}}));
  EXPECT_EQ(info.launcher, "torchrun");
  EXPECT_EQ(info.rank, 11);
  EXPECT_EQ(info.world_size, 16);
  EXPECT_EQ(info.local_rank, 3);
  EXPECT_EQ(info.local_world_size, 8);
  EXPECT_EQ(info.master_addr, "node0");
  EXPECT_EQ(info.master_port, 29500);
  EXPECT_EQ(info.store_port, 29500);
  EXPECT_TRUE(info.multi_process());
}

// torchrun's agent serves its own store on MASTER_PORT: pgolf's goes on the next port, unless told.
TEST(LaunchEnv, TorchrunAgentStoreMovesOursToTheNextPort) {
  Env env = with_master({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  EXPECT_EQ(parse(env).store_port, 29501);
  env["PGOLF_STORE_PORT"] = "31000";
  EXPECT_EQ(parse(env).store_port, 31000);
}

TEST(LaunchEnv, OpenMpi) {
  const LaunchInfo info = parse(with_master({{"OMPI_COMM_WORLD_RANK", "5"},
                                             {"OMPI_COMM_WORLD_SIZE", "16"},
                                             {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                             {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}));
  EXPECT_EQ(info.launcher, "openmpi");
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.world_size, 16);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_world_size, 4);
}

TEST(LaunchEnv, PmiHydraAndCray) {
  const LaunchInfo hydra = parse(
      with_master({{"PMI_RANK", "2"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "0"}, {"MPI_LOCALNRANKS", "2"}}));
  EXPECT_EQ(hydra.launcher, "pmi");
  EXPECT_EQ(hydra.rank, 2);
  EXPECT_EQ(hydra.world_size, 4);
  EXPECT_EQ(hydra.local_rank, 0);
  EXPECT_EQ(hydra.local_world_size, 2);
  const LaunchInfo cray = parse(
      with_master({{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}, {"PMI_LOCAL_RANK", "1"}, {"PMI_LOCAL_SIZE", "2"}}));
  EXPECT_EQ(cray.local_rank, 1);
  EXPECT_EQ(cray.local_world_size, 2);
  // No local values: the rendezvous derives them from host names.
  const LaunchInfo bare = parse(with_master({{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}}));
  EXPECT_EQ(bare.local_rank, -1);
  EXPECT_EQ(bare.local_world_size, -1);
}

TEST(LaunchEnv, SlurmStepButNotTheBatchScript) {
  const LaunchInfo info = parse(
      with_master({{"SLURM_PROCID", "7"}, {"SLURM_STEP_NUM_TASKS", "16"}, {"SLURM_LOCALID", "3"},
                   {"SLURM_NTASKS", "16"}}));
  EXPECT_EQ(info.launcher, "slurm");
  EXPECT_EQ(info.rank, 7);
  EXPECT_EQ(info.world_size, 16);
  EXPECT_EQ(info.local_rank, 3);
  EXPECT_EQ(info.local_world_size, -1);
  // The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS but is one process.
  const LaunchInfo script = parse({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "16"}, {"SLURM_JOB_ID", "42"}});
  EXPECT_EQ(script.launcher, "none");
  EXPECT_EQ(script.world_size, 1);
}

TEST(LaunchEnv, TorchrunInsideSlurmWins) {
  const LaunchInfo info = parse(with_master(
      {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "1"},
       {"SLURM_LOCALID", "0"}}));
  EXPECT_EQ(info.launcher, "torchrun");
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.world_size, 2);
}

TEST(LaunchEnv, OneProcessNeedsNoMaster) {
  const LaunchInfo info = parse({{"RANK", "0"}, {"WORLD_SIZE", "1"}});
  EXPECT_EQ(info.launcher, "torchrun");
  EXPECT_FALSE(info.multi_process());
  EXPECT_TRUE(info.master_addr.empty());
}

TEST(LaunchEnv, MissingMasterNamesTheLaunchersWay) {
  const std::string torchrun = error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}});
  EXPECT_NE(torchrun.find("MASTER_ADDR and MASTER_PORT"), std::string::npos) << torchrun;
  EXPECT_NE(torchrun.find("WORLD_SIZE=2"), std::string::npos) << torchrun;
  const std::string mpi =
      error_of({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}});
  EXPECT_NE(mpi.find("mpirun -x MASTER_ADDR"), std::string::npos) << mpi;
  const std::string pmi = error_of({{"PMI_RANK", "0"}, {"PMI_SIZE", "2"}});
  EXPECT_NE(pmi.find("-genv MASTER_ADDR"), std::string::npos) << pmi;
  const std::string slurm = error_of({{"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "2"}});
  EXPECT_NE(slurm.find("before srun"), std::string::npos) << slurm;
}

TEST(LaunchEnv, MalformedValuesAreErrorsNamingTheVariable) {
  EXPECT_NE(error_of(with_master({{"RANK", "one"}, {"WORLD_SIZE", "2"}})).find("RANK='one' is not an integer"),
            std::string::npos);
  EXPECT_NE(error_of(with_master({{"RANK", "2"}, {"WORLD_SIZE", "2"}})).find("RANK=2 is outside [0, WORLD_SIZE=2)"),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}}).find("RANK is set but WORLD_SIZE is not"), std::string::npos);
  EXPECT_NE(error_of(with_master({{"WORLD_SIZE", "2"}})).find("RANK is not"), std::string::npos);
  EXPECT_NE(error_of(with_master({{"RANK", "0"}, {"WORLD_SIZE", "0"}})).find("WORLD_SIZE=0 must be at least 1"),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}})
                .find("MASTER_PORT=70000"),
            std::string::npos);
  EXPECT_NE(error_of(with_master({{"RANK", "0"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "5"}, {"LOCAL_WORLD_SIZE", "4"}}))
                .find("LOCAL_WORLD_SIZE=4 does not fit LOCAL_RANK=5"),
            std::string::npos);
}
