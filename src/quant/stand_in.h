// Stand-in weights for format, size and timing checks of the artifact path when no trained
// checkpoint is at hand: every parameter of the preset's model drawn from N(0, std²) with pgolf's
// deterministic Rng. (They compress differently from trained weights.)
#pragma once

#include <cstdint>

#include "core/config.h"
#include "core/tensor.h"

namespace pgolf {

TensorMap stand_in_parameters(const Config& cfg, double std, uint64_t seed);

}  // namespace pgolf
