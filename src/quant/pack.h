// Packing a checkpoint into an artifact (what `pgolf pack` does, usable from code): select the
// preset's parameters from the checkpoint, unbank, quantize with the preset's export, and count the
// bytes against the challenge cap (SPEC 1, 5.9).
#pragma once

#include <cstdint>
#include <string>

#include "core/config.h"
#include "core/fs.h"
#include "quant/artifact.h"

namespace pgolf {

inline constexpr int64_t kArtifactCapBytes = 16'000'000;  // code bytes + compressed model bytes

// The preset model's parameters, in its parameter order, taken from a checkpoint that may hold more
// (optimizer state); each must be present with the model's shape. Float dtypes are kept.
TensorMap select_parameters(const Config& cfg, const TensorMap& checkpoint, const std::string& what);

// Quantizes `params` (checkpoint names; banks are unbanked here) with the configuration's scheme.
// `hessians` (hessian/<weight name>) is needed by quant_scheme = gptq_full.
Artifact build_artifact(const Config& cfg, const TensorMap& params, const TensorMap* hessians);

// The code archive made at build time beside the pgolf binary (README "Artifact size accounting").
fs::path default_code_archive();
int64_t code_archive_bytes(const fs::path& archive);

}  // namespace pgolf
