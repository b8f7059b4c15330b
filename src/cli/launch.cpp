#include "cli/launch.h"

#include <vector>

#include "core/error.h"
#include "dist/launcher.h"
#ifdef PGOLF_HAVE_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace pgolf::cli {

namespace {
std::vector<std::string>& command_line() {
  static std::vector<std::string> args;
  return args;
}
}  // namespace

void set_command_line(int argc, char** argv) { command_line().assign(argv, argv + argc); }

void NprocOption::add_to(CLI::App* cmd) {
  cmd->add_option("--nproc", nproc,
                  "run N ranks on this machine, one process each (torchrun's variables; not under torchrun, mpirun "
                  "or srun, which start the processes themselves)");
}

std::optional<int> NprocOption::launch_ranks() const {
  PG_CHECK(nproc >= 1, "--nproc {} must be at least 1", nproc);
  if (nproc == 1) return std::nullopt;
  const LaunchInfo launch = read_launch_env();
  if (launch.launcher != "none") {
    PG_CHECK(launch.local_world_size < 0 || launch.local_world_size == nproc,
             "--nproc {}: {} started this process as one of {} on this machine; pgolf starts no more (drop --nproc "
             "or make it match)",
             nproc, launch.launcher, launch.local_world_size);
    return std::nullopt;
  }
  PG_CHECK(!command_line().empty(), "--nproc: the command line was not recorded");
  LocalLaunch local;
  local.args = command_line();
  local.nproc = nproc;
  return run_local_ranks(local);
}

void exit_command(int status) {
  if (status != 0) throw CLI::RuntimeError(status);
}

ProcessGroup join_process_group(const std::string& command, bool device_collectives) {
  ProcessGroup group;
  group.launch = read_launch_env();
  if (!device_collectives) {
    PG_CHECK(!group.launch.multi_process(),
             "{}: {} processes were started ({}), but a host engine runs in one process: multi-process runs need "
             "the CUDA engine and NCCL, one process per GPU (the CPU engine's data-parallel logic is tested with "
             "ranks as threads of one process)",
             command, group.launch.world_size, group.launch.launcher);
    group.comm = make_single_process_communicator();
    return group;
  }
#ifdef PGOLF_HAVE_NCCL
  int local_rank = 0;
  if (group.launch.multi_process()) {
    group.rendezvous = std::make_unique<Rendezvous>(group.launch);
    local_rank = group.rendezvous->launch().local_rank;
  }
  group.device = bind_local_gpu(local_rank, false);
  // The engine gives its stream with set_stream before its first collective.
  if (group.rendezvous) group.comm = std::make_unique<NcclCommunicator>(*group.rendezvous, nullptr);
  else group.comm = std::make_unique<NcclCommunicator>(nullptr);
  return group;
#else
  fail("{}: this pgolf was built without NCCL, which device engines need for their collectives", command);
#endif
}

}  // namespace pgolf::cli
