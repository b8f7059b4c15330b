#include "quant/stand_in.h"

#include "core/rng.h"
#include "model/params.h"

namespace pgolf {

TensorMap stand_in_parameters(const Config& cfg, double std, uint64_t seed) {
  ParamSet<float> p{ParamLayout(param_specs(ModelConfig::from_config(cfg)))};
  Rng rng(seed);
  for (size_t i = 0; i < p.layout().size(); ++i)
    for (float& x : p[i]) x = static_cast<float>(std * rng.normal());
  return p.to_tensors();
}

}  // namespace pgolf
