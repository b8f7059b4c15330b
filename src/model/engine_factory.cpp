#include "model/engine_factory.h"

#include <algorithm>

#include "core/error.h"
#include "dist/communicator.h"
#include "train/cpu_engine.h"
#ifdef PGOLF_HAVE_CUDA
#include "backend/cuda/cuda_engine.h"
#include "backend/cuda/device.h"
#endif

namespace pgolf {

int64_t default_max_tokens(const Config& config, int world_size) {
  PG_CHECK(world_size >= 1, "default_max_tokens: world size {}", world_size);
  const int64_t accum_setting = config.get_int("grad_accum_steps");
  const int64_t accum = accum_setting > 0 ? accum_setting : std::max<int64_t>(1, 8 / world_size);
  const int64_t micro = config.get_int("train_batch_tokens") / (world_size * accum);
  const int64_t ttt = config.get_int("ttt_batch_seqs") * config.get_int("train_seq_len");
  int64_t lora = 0;
  for (const std::string& mode : config.get_string_list("eval_modes"))
    if (mode == "ttt-lora" || mode == "ttt-phased")
      lora = config.get_int("ttt_batch_size") * config.get_int("ttt_eval_seq_len");
  return std::max({micro, ttt, lora});
}

bool cuda_available() {
#ifdef PGOLF_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

std::string resolve_device(const std::string& requested) {
  if (requested == "cpu" || requested == "cuda") return requested;
  PG_CHECK(requested == "auto", "unknown device '{}': expected auto, cpu or cuda", requested);
#ifdef PGOLF_HAVE_CUDA
  if (cuda::device_count() > 0) return "cuda";
#endif
  return "cpu";
}

std::unique_ptr<Engine> make_engine(const Config& config, Communicator& comm, const std::string& device,
                                    const EngineOptions& options) {
  if (device == "cpu") return std::make_unique<CpuEngine>(config, comm);
  PG_CHECK(device == "cuda", "unknown device '{}': expected cpu or cuda", device);
#ifdef PGOLF_HAVE_CUDA
  cuda::CudaEngineOptions o;
  o.max_tokens = options.max_tokens > 0 ? options.max_tokens : default_max_tokens(config, comm.world_size());
  o.deterministic = options.deterministic;
  o.graphs = options.graphs;
  return std::make_unique<cuda::CudaEngine>(config, comm, o);
#else
  (void)options;
  fail("device 'cuda': this pgolf was built without the CUDA backend (no nvcc at configure time, or PGOLF_CUDA=OFF)");
#endif
}

}  // namespace pgolf
