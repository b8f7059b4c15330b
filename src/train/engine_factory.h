// The engines a command can run, by backend name: "cpu" (CpuEngine) always; the CUDA engine
// registers "cuda" when it is built in. An engine is made for one rank from the configuration and
// that rank's Communicator, whose buffers must live where the engine keeps its tensors.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "dist/communicator.h"
#include "model/engine.h"

namespace pgolf {

struct EngineBackend {
  std::string name;
  // Its collectives act on device buffers (the NCCL communicator): the only kind that runs one
  // process per rank. Host engines run one process, or ranks as threads of one (tests).
  bool device_collectives = false;
  std::function<std::unique_ptr<Engine>(const Config&, Communicator&)> make;
};

// Adds (or replaces) a backend.
void register_engine_backend(EngineBackend backend);
// The backend called `name`; an unknown name is an error listing the known ones.
const EngineBackend& engine_backend(const std::string& name);
std::vector<std::string> engine_backend_names();

}  // namespace pgolf
