// Multi-process runs from the command line. `--nproc N` on a command starts N ranks of the same
// command line on this machine (dist/launcher.h); under torchrun, mpirun or srun the processes
// exist already. Each rank then joins the run with join_process_group.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <optional>
#include <string>

#include "dist/communicator.h"
#include "dist/rendezvous.h"

namespace pgolf::cli {

// main() records its arguments: the ranks run the same command line.
void set_command_line(int argc, char** argv);

struct NprocOption {
  int nproc = 1;
  void add_to(CLI::App* cmd);
  // --nproc N > 1 outside any launcher: starts the N ranks, waits and returns their exit status
  // (the command is then done). Otherwise nullopt: this process runs the command itself; under a
  // launcher that said how many processes it started here, N must match that number. `device` is
  // the command's engine ("cpu" runs in one process: refused, naming `command`), empty without one.
  std::optional<int> launch_ranks(const std::string& command, const std::string& device) const;
};

// Ends a command callback with `status` as the program's exit status.
void exit_command(int status);

// This process's place in the run.
struct ProcessGroup {
  LaunchInfo launch;
  std::unique_ptr<Rendezvous> rendezvous;  // several processes only; outlives comm (declared first)
  std::unique_ptr<Communicator> comm;
  bool lead() const { return comm->rank() == 0; }  // rank 0 prints and writes
};

// Joins the run of this process for an engine on `device` ("cpu" or "cuda"). One process: the
// single-process communicator. Several (a launcher's WORLD_SIZE > 1): CUDA only, through NCCL, each
// rank on the GPU of its local rank; the CPU engine is refused with a message naming `command`.
ProcessGroup join_process_group(const std::string& command, const std::string& device);

}  // namespace pgolf::cli
