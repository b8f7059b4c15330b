// pgolf dist-selftest (hidden): checks the multi-process machinery where it runs. Each rank reads
// its launch environment, joins the rendezvous store and checks it (values of every rank, a barrier,
// shared-counter tickets unique across ranks); then, with CUDA and NCCL, runs every collective in
// every dtype through NcclCommunicator on its GPU and compares with the values it must give.
//   pgolf dist-selftest --nproc 2                 (this machine; or under torchrun / mpirun / srun)
// With fewer GPUs than local ranks, --allow-shared-gpu lets ranks share GPUs: NCCL refuses two ranks
// of one communicator on one GPU, so each process then checks NCCL at world size 1.
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/launch.h"
#include "core/error.h"
#include "dist/rendezvous.h"
#ifdef PGOLF_HAVE_NCCL
#include <cuda_runtime.h>

#include "backend/cuda/check.h"
#include "backend/cuda/device.h"
#include "dist/nccl_communicator.h"
#endif

namespace pgolf::cli {

namespace {

// Values set by every rank are read back by every rank; tickets drawn from the shared counter are
// unique and together cover 0 .. tickets·world - 1; every rank has passed the barrier.
void check_store(Rendezvous& rv) {
  TcpStore& store = rv.store();
  const int rank = rv.rank(), world = rv.world_size();
  auto value_of = [](int r) {
    return fmt::format("rank {}:", r) + std::string(static_cast<size_t>(997 * r), static_cast<char>('a' + r % 26));
  };
  store.set(fmt::format("selftest/value/{}", rank), value_of(rank));
  for (int r = 0; r < world; ++r) {
    const std::string got = store.get(fmt::format("selftest/value/{}", r));
    PG_CHECK(got == value_of(r), "store: rank {} read {} bytes for rank {}'s value, expected {}", rank, got.size(), r,
             value_of(r).size());
  }
  store.add("selftest/arrivals", 1);
  rv.barrier();
  const int64_t arrived = store.add("selftest/arrivals", 0);
  PG_CHECK(arrived == world, "store: rank {} passed the barrier with {} of {} ranks arrived", rank, arrived, world);

  constexpr int kTickets = 200;
  rv.reset_counter(0);
  std::vector<int64_t> mine;
  for (int k = 0; k < kTickets; ++k) mine.push_back(rv.fetch_add(1));
  store.set(fmt::format("selftest/tickets/{}", rank), fmt::format("{}", fmt::join(mine, " ")));
  rv.barrier();
  std::vector<int64_t> all;
  for (int r = 0; r < world; ++r) {
    const std::string text = store.get(fmt::format("selftest/tickets/{}", r));
    size_t at = 0;
    while (at < text.size()) {
      size_t end = text.find(' ', at);
      if (end == std::string::npos) end = text.size();
      all.push_back(std::stoll(text.substr(at, end - at)));
      at = end + 1;
    }
  }
  std::sort(all.begin(), all.end());
  for (size_t k = 0; k < all.size(); ++k)
    PG_CHECK(all[k] == static_cast<int64_t>(k) && all.size() == static_cast<size_t>(kTickets * world),
             "store: the {} tickets of {} ranks are not 0..{} each once (position {} holds {})", all.size(), world,
             kTickets * world - 1, k, all[k]);
  fmt::print("store: ok (values of {} ranks, barrier, {} unique counter tickets)\n", world, all.size());
}

#ifdef PGOLF_HAVE_NCCL
void check_nccl(Rendezvous& rv, bool allow_shared_gpu) {
  const LaunchInfo& launch = rv.launch();
  const int gpus = cuda::device_count();
  if (gpus == 0) {
    fmt::print("nccl: skipped (no CUDA device visible)\n");
    return;
  }
  const bool shared = launch.local_world_size > gpus;
  PG_CHECK(!shared || allow_shared_gpu,
           "{} ranks on this machine but {} GPU(s): NCCL needs one GPU per rank (--allow-shared-gpu checks NCCL at "
           "world size 1 in each process where NCCL refuses to share)",
           launch.local_world_size, gpus);
  const int device = bind_local_gpu(launch.local_rank, allow_shared_gpu);
  cudaStream_t stream = nullptr;
  PG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    std::unique_ptr<NcclCommunicator> comm;
    try {
      comm = std::make_unique<NcclCommunicator>(rv, stream);
    } catch (const Error& e) {
      if (!shared) throw;
      fmt::print("nccl: NCCL refused {} ranks on {} GPU(s): {}\n", launch.world_size, gpus, e.what());
      comm = std::make_unique<NcclCommunicator>(stream);
    }
    const auto space = make_device_buffer_space(stream);
    for (size_t count : {size_t{1}, size_t{4099}, size_t{1} << 20 | 1}) {
      const std::vector<std::string> failures = check_collectives(*comm, *space, count);
      for (const std::string& f : failures) fmt::print(stderr, "nccl: {}\n", f);
      PG_CHECK(failures.empty(), "nccl: {} collective check(s) failed at {} elements per rank", failures.size(), count);
    }
    fmt::print("nccl: ok (all_reduce, reduce_scatter, all_gather, broadcast in F32/F64/BF16/I32/I64, "
               "all_reduce_host, barrier, counter; world size {}, GPU {}, NCCL {})\n",
               comm->world_size(), device, nccl_version());
  }
  PG_CUDA_CHECK(cudaStreamDestroy(stream));
}
#endif

}  // namespace

void register_dist_selftest(CLI::App& app) {
  auto* cmd = app.add_subcommand("dist-selftest", "check the launch environment, the rendezvous store and NCCL");
  cmd->group("");  // hidden from the command list
  static NprocOption nproc;
  static bool allow_shared_gpu = false, store_only = false;
  static int fail_rank = -1;
  static double timeout = 0.0;
  nproc.add_to(cmd);
  cmd->add_flag("--allow-shared-gpu", allow_shared_gpu,
                "let local ranks share GPUs; NCCL is then checked at world size 1 where it refuses");
  cmd->add_flag("--store-only", store_only, "check the launch and the store, not NCCL");
  cmd->add_option("--fail-rank", fail_rank, "this rank fails on purpose after joining (tests the failure path)");
  cmd->add_option("--timeout", timeout, "seconds to wait for the other ranks (default PGOLF_DIST_TIMEOUT or 600)");
  cmd->callback([] {
    if (auto status = nproc.launch_ranks("pgolf dist-selftest", "")) return exit_command(*status);
    Rendezvous rv(read_launch_env(), timeout > 0.0 ? timeout : dist_timeout_seconds());
    const LaunchInfo& launch = rv.launch();
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    fmt::print("dist-selftest: rank {} of {}, local rank {} of {}, launcher {}, host {}, store port {}\n", launch.rank,
               launch.world_size, launch.local_rank, launch.local_world_size, launch.launcher, host,
               rv.store().port());
    PG_CHECK(launch.rank != fail_rank, "rank {} fails on purpose (--fail-rank)", fail_rank);
    check_store(rv);
#ifdef PGOLF_HAVE_NCCL
    if (store_only) fmt::print("nccl: skipped (--store-only)\n");
    else check_nccl(rv, allow_shared_gpu);
#else
    fmt::print("nccl: not built into this pgolf\n");
#endif
    rv.barrier();
    fmt::print("dist-selftest: rank {} passed\n", launch.rank);
  });
}

}  // namespace pgolf::cli
