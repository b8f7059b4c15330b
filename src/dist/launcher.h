// Starting the ranks of a run on this machine, as `torchrun --nproc_per_node N` does for one node:
// N processes of one program with torchrun's variables, their output relayed line by line with the
// rank in front, signals forwarded, and the whole group stopped as soon as one rank fails.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pgolf {

struct LocalLaunch {
  std::string executable = "/proc/self/exe";  // this very program by default
  std::vector<std::string> args;              // argv of every rank, args[0] included
  int nproc = 2;
  std::vector<std::pair<std::string, std::string>> env;  // more variables for every rank
  double grace_seconds = 10.0;  // after SIGTERM, SIGKILL follows this long after
};

enum class OutputStream { Out, Err };

// Receives each line (without its newline) that rank `rank` wrote to `stream`; rank -1 is the
// launcher's own report (on Err).
using LineSink = std::function<void(int rank, OutputStream stream, std::string_view line)>;

// "[rank R] line" on this process's stdout or stderr; the launcher's own lines as "pgolf: line".
void print_rank_line(int rank, OutputStream stream, std::string_view line);

// For a command whose standard output is one machine-readable document (--json): rank 0's standard
// output lines go to `document` as they are; every other line goes to `others` on standard error
// (the other ranks' standard output included), so the document stays parseable.
LineSink rank0_document_sink(std::function<void(std::string_view)> document, LineSink others = print_rank_line);

// Starts `launch.nproc` ranks with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK=0,
// MASTER_ADDR=127.0.0.1, MASTER_PORT (a free port) and the NVLink-multicast switches of
// default_nccl_environment() where the user has not set them. Each rank runs in its own process
// group with stdin from /dev/null and dies with this process. SIGINT, SIGTERM and SIGHUP received
// here are forwarded to every rank. When a rank fails (non-zero status or a signal) the others are
// sent SIGTERM, then SIGKILL after the grace period.
// Returns 0 when every rank succeeded; else the first failing rank's exit status (128 + signal
// number when a signal ended it), or 128 + signal when this process was interrupted.
int run_local_ranks(const LocalLaunch& launch, const LineSink& sink = print_rank_line);

}  // namespace pgolf
