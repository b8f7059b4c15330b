#include "train/engine_factory.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>

#include "core/error.h"
#include "train/cpu_engine.h"

namespace pgolf {

namespace {

std::map<std::string, EngineBackend>& backends() {
  static std::map<std::string, EngineBackend> all = [] {
    std::map<std::string, EngineBackend> m;
    m["cpu"] = EngineBackend{"cpu", false, [](const Config& c, Communicator& comm) -> std::unique_ptr<Engine> {
                               return std::make_unique<CpuEngine>(c, comm);
                             }};
    return m;
  }();
  return all;
}

}  // namespace

void register_engine_backend(EngineBackend backend) {
  PG_CHECK(!backend.name.empty() && backend.make, "an engine backend needs a name and a factory");
  backends()[backend.name] = std::move(backend);
}

const EngineBackend& engine_backend(const std::string& name) {
  auto it = backends().find(name);
  PG_CHECK(it != backends().end(), "engine backend '{}' is not built into this pgolf (available: {})", name,
           fmt::join(engine_backend_names(), ", "));
  return it->second;
}

std::vector<std::string> engine_backend_names() {
  std::vector<std::string> names;
  for (const auto& [name, backend] : backends()) names.push_back(name);
  return names;
}

}  // namespace pgolf
