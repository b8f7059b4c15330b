#include "cli/launch.h"

#include <algorithm>
#include <cstdio>
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

namespace {
void require_multi_process_device(const std::string& command, int processes, const std::string& device) {
  PG_CHECK(device == "cuda",
           "{}: {} processes, but the {} engine runs in one process; multi-process runs need the CUDA engine "
           "(--device cuda) and NCCL, one process per GPU (the CPU engine's data-parallel logic is tested with "
           "ranks as threads of one process)",
           command, processes, device);
}
}  // namespace

std::optional<int> NprocOption::launch_ranks(const std::string& command, const std::string& device) const {
  PG_CHECK(nproc >= 1, "--nproc {} must be at least 1", nproc);
  if (nproc == 1) return std::nullopt;
  if (!device.empty()) require_multi_process_device(command + " --nproc " + std::to_string(nproc), nproc, device);
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
  // --json: rank 0's standard output is the document, passed through without the rank prefix.
  if (std::find(local.args.begin(), local.args.end(), "--json") != local.args.end())
    return run_local_ranks(local, rank0_document_sink([](std::string_view line) {
                             std::fprintf(stdout, "%.*s\n", static_cast<int>(line.size()), line.data());
                             std::fflush(stdout);
                           }));
  return run_local_ranks(local);
}

void exit_command(int status) {
  if (status != 0) throw CLI::RuntimeError(status);
}

ProcessGroup join_process_group(const std::string& command, const std::string& device) {
  ProcessGroup group;
  group.launch = read_launch_env();
  if (!group.launch.multi_process()) {
    group.comm = make_single_process_communicator();
    return group;
  }
  require_multi_process_device(fmt::format("{} ({} started {} processes)", command, group.launch.launcher,
                                           group.launch.world_size),
                               group.launch.world_size, device);
#ifdef PGOLF_HAVE_NCCL
  group.rendezvous = std::make_unique<Rendezvous>(group.launch);
  bind_local_gpu(group.rendezvous->launch().local_rank, false);
  // The engine gives its stream (set_stream) when it is made.
  group.comm = std::make_unique<NcclCommunicator>(*group.rendezvous, nullptr);
  return group;
#else
  fail("{}: this pgolf was built without NCCL, which multi-process CUDA runs need", command);
#endif
}

}  // namespace pgolf::cli
