// How the processes of a multi-process run find each other: the launch environment (torchrun,
// mpirun, srun or `pgolf … --nproc N`) says each process's rank, and a TcpStore on
// MASTER_ADDR:MASTER_PORT (rank 0 serves) carries the bootstrap bytes: NCCL's unique id, host names,
// barriers before NCCL exists and the shared work counter. Tensor traffic never goes through it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dist/tcp_store.h"

namespace pgolf {

struct LaunchInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = -1;        // rank among the processes of this machine; -1 = the launcher did not say
  int local_world_size = -1;  // processes on this machine; -1 = the launcher did not say
  std::string master_addr;    // rank 0's host (required when world_size > 1)
  int master_port = 0;
  // The port of pgolf's store: MASTER_PORT, or MASTER_PORT + 1 under torchrun, whose agent already
  // serves its own store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True); PGOLF_STORE_PORT overrides.
  int store_port = 0;
  std::string launcher = "none";  // where the values came from: torchrun, openmpi, pmi, slurm or none

  bool multi_process() const { return world_size > 1; }
};

using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

// Reads the first launch environment present, in this order:
//   torchrun (also `pgolf --nproc`): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
//   Open MPI: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
//   PMI (MPICH / Intel MPI hydra, Cray): PMI_RANK, PMI_SIZE; MPI_LOCALRANKID / MPI_LOCALNRANKS or
//     PMI_LOCAL_RANK / PMI_LOCAL_SIZE
//   Slurm's srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS (set for each task of a job step, not in the batch
//     script itself), SLURM_LOCALID
// plus MASTER_ADDR and MASTER_PORT, which every multi-process launch needs (and PGOLF_STORE_PORT).
// None present: one process.
// Malformed or inconsistent values are errors naming the variable.
LaunchInfo read_launch_env(const EnvLookup& env);
LaunchInfo read_launch_env();  // the process environment

// Seconds a rank waits for the others (connecting, store waits, NCCL host waits): PGOLF_DIST_TIMEOUT,
// default 600.
double dist_timeout_seconds();

// NVLink multicast (NVLS) stays off unless the user set the switches: NCCL_NVLS_ENABLE=0,
// TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1. Call before NCCL initialises.
void set_default_nccl_environment();
// The same defaults as name=value pairs (for the environment of processes we start).
std::vector<std::pair<std::string, std::string>> default_nccl_environment();

// The ranks of one run, joined through the store.
class Rendezvous {
 public:
  // Every rank constructs it with its LaunchInfo. World size 1 without a MASTER_ADDR serves a
  // private store on a free loopback port. Missing local ranks are derived from host names.
  explicit Rendezvous(const LaunchInfo& launch, double timeout_s = dist_timeout_seconds());

  const LaunchInfo& launch() const { return launch_; }
  int rank() const { return launch_.rank; }
  int world_size() const { return launch_.world_size; }
  TcpStore& store() { return *store_; }

  void barrier() { store_->barrier(); }
  // A fresh store key under `prefix`: the n-th call on every rank returns the same key.
  std::string next_key(const std::string& prefix) { return prefix + "/" + std::to_string(keys_++); }
  // The run's shared counter (Communicator::fetch_add / reset_counter).
  int64_t fetch_add(int64_t inc);
  void reset_counter(int64_t value);  // collective

 private:
  LaunchInfo launch_;
  std::unique_ptr<TcpStore> store_;
  int64_t keys_ = 0;
};

}  // namespace pgolf
