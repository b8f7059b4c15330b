#include "dist/rendezvous.h"

#include <unistd.h>

#include <charconv>
#include <cstdlib>

#include "core/error.h"

namespace pgolf {

namespace {

// One launcher's variables. `locals` lists (local rank, local size) name pairs, first present wins.
struct LaunchSource {
  const char* launcher;
  const char* rank;
  const char* size;
  std::vector<std::pair<const char*, const char*>> locals;
  const char* master_hint;  // how to give MASTER_ADDR / MASTER_PORT under this launcher
};

const std::vector<LaunchSource>& launch_sources() {
  static const std::vector<LaunchSource> sources = {
      {"torchrun", "RANK", "WORLD_SIZE", {{"LOCAL_RANK", "LOCAL_WORLD_SIZE"}},
       "torchrun and pgolf --nproc set them"},
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
       {{"OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"}},
       "pass them to every rank: mpirun -x MASTER_ADDR=<rank 0's host> -x MASTER_PORT=<port>"},
      {"pmi", "PMI_RANK", "PMI_SIZE", {{"MPI_LOCALRANKID", "MPI_LOCALNRANKS"}, {"PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"}},
       "pass them to every rank: mpiexec -genv MASTER_ADDR <rank 0's host> -genv MASTER_PORT <port>"},
      {"slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", {{"SLURM_LOCALID", nullptr}},
       "export them before srun (MASTER_ADDR = the first host of the job, e.g. from scontrol show hostnames)"},
  };
  return sources;
}

int parse_int(const EnvLookup& env, const char* name, const std::string& launcher) {
  const std::string text = env(name).value_or("");
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  PG_CHECK(!text.empty() && ec == std::errc() && end == text.data() + text.size(),
           "{}='{}' is not an integer (launch environment of {})", name, text, launcher);
  return value;
}

}  // namespace

LaunchInfo read_launch_env(const EnvLookup& env) {
  LaunchInfo info;
  const LaunchSource* source = nullptr;
  for (const LaunchSource& s : launch_sources()) {
    if (env(s.size)) {
      source = &s;
      break;
    }
    PG_CHECK(std::string(s.launcher) != "torchrun" || !env(s.rank), "RANK is set but WORLD_SIZE is not");
  }
  if (!source) return info;

  const std::string launcher = source->launcher;
  info.launcher = launcher;
  info.world_size = parse_int(env, source->size, launcher);
  PG_CHECK(env(source->rank), "{}={} is set but {} is not", source->size, info.world_size, source->rank);
  info.rank = parse_int(env, source->rank, launcher);
  PG_CHECK(info.world_size >= 1, "{}={} must be at least 1", source->size, info.world_size);
  PG_CHECK(info.rank >= 0 && info.rank < info.world_size, "{}={} is outside [0, {}={})", source->rank, info.rank,
           source->size, info.world_size);
  for (const auto& [local_rank, local_size] : source->locals) {
    if (!env(local_rank)) continue;
    info.local_rank = parse_int(env, local_rank, launcher);
    if (local_size && env(local_size)) info.local_world_size = parse_int(env, local_size, launcher);
    PG_CHECK(info.local_rank >= 0 && info.local_rank < info.world_size, "{}={} is outside [0, {})", local_rank,
             info.local_rank, info.world_size);
    PG_CHECK(info.local_world_size < 0 ||
                 (info.local_world_size > info.local_rank && info.local_world_size <= info.world_size),
             "{}={} does not fit {}={} and a world size of {}", local_size, info.local_world_size, local_rank,
             info.local_rank, info.world_size);
    break;
  }

  if (auto addr = env("MASTER_ADDR")) info.master_addr = *addr;
  if (env("MASTER_PORT")) info.master_port = parse_int(env, "MASTER_PORT", launcher);
  if (info.world_size > 1) {
    PG_CHECK(!info.master_addr.empty() && env("MASTER_PORT"),
             "{}={}: a multi-process run needs MASTER_ADDR and MASTER_PORT (rank 0's host and a free port; {})",
             source->size, info.world_size, source->master_hint);
    PG_CHECK(info.master_port > 0 && info.master_port < 65536, "MASTER_PORT={} is not a port in 1..65535",
             info.master_port);
  }
  info.store_port = info.master_port;
  if (env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True") info.store_port = info.master_port + 1;
  if (env("PGOLF_STORE_PORT")) info.store_port = parse_int(env, "PGOLF_STORE_PORT", launcher);
  PG_CHECK(info.world_size == 1 || (info.store_port > 0 && info.store_port < 65536),
           "the rendezvous store's port {} is not in 1..65535 (MASTER_PORT={}, PGOLF_STORE_PORT)", info.store_port,
           info.master_port);
  return info;
}

LaunchInfo read_launch_env() {
  return read_launch_env([](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    return v ? std::optional<std::string>(v) : std::nullopt;
  });
}

double dist_timeout_seconds() {
  const char* text = std::getenv("PGOLF_DIST_TIMEOUT");
  if (!text || !*text) return 600.0;
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  PG_CHECK(end && *end == '\0' && v > 0.0, "PGOLF_DIST_TIMEOUT='{}' is not a positive number of seconds", text);
  return v;
}

std::vector<std::pair<std::string, std::string>> default_nccl_environment() {
  return {{"NCCL_NVLS_ENABLE", "0"}, {"TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"}, {"NVSHMEM_DISABLE_NVLS", "1"}};
}

void set_default_nccl_environment() {
  for (const auto& [name, value] : default_nccl_environment()) ::setenv(name.c_str(), value.c_str(), 0);
}

Rendezvous::Rendezvous(const LaunchInfo& launch, double timeout_s) : launch_(launch) {
  if (launch_.world_size == 1 && launch_.master_addr.empty()) {
    store_ = std::make_unique<TcpStore>("127.0.0.1", 0, 0, 1, timeout_s);
  } else {
    PG_CHECK(!launch_.master_addr.empty(), "rank {} of {}: no MASTER_ADDR to meet the other ranks at", launch_.rank,
             launch_.world_size);
    store_ = std::make_unique<TcpStore>(launch_.master_addr, launch_.store_port, launch_.rank, launch_.world_size,
                                        timeout_s);
  }
  // Every rank of one launch lacks the same values, so they all take part in this exchange or none.
  if (launch_.local_rank >= 0 && launch_.local_world_size >= 0) return;
  char host[256] = {};
  PG_CHECK(::gethostname(host, sizeof(host) - 1) == 0, "gethostname failed");
  store_->set(fmt::format("pgolf/host/{}", launch_.rank), host);
  int below = 0, same = 0;
  for (int r = 0; r < launch_.world_size; ++r) {
    if (store_->get(fmt::format("pgolf/host/{}", r)) != host) continue;
    ++same;
    if (r < launch_.rank) ++below;
  }
  if (launch_.local_rank < 0) launch_.local_rank = below;
  if (launch_.local_world_size < 0) launch_.local_world_size = same;
}

int64_t Rendezvous::fetch_add(int64_t inc) { return store_->add("pgolf/counter", inc) - inc; }

void Rendezvous::reset_counter(int64_t value) {
  store_->barrier();  // every rank is done with the old count
  if (launch_.rank == 0) store_->set("pgolf/counter", encode_store_int(value));
  store_->barrier();
}

}  // namespace pgolf
