// Helpers for the GPU optimizer tests: parameter sets on the device, bit comparisons, small presets.
#pragma once

#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "model/config.h"
#include "model/params.h"
#include "optim/optimizer.h"

namespace pgolf::test {

inline cuda::DeviceBuffer<float> upload(std::span<const float> values) {
  return cuda::DeviceBuffer<float>(std::vector<float>(values.begin(), values.end()), "test array");
}

inline ParamSet<float> download_params(const ParamLayout& layout, const cuda::DeviceBuffer<float>& device) {
  ParamSet<float> out(layout);
  std::vector<float> v = device.download();
  std::copy(v.begin(), v.end(), out.all().begin());
  return out;
}

inline void fill_normal(std::span<float> v, Rng& rng, double scale) {
  for (float& x : v) x = static_cast<float>(scale * rng.normal());
}

// How many elements differ in their bits (0 = identical arrays).
inline size_t bit_mismatches(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  size_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return n;
}

// A full-size preset, or the preset at the golden small size (d 64, 4 heads of 16, 2 KV heads).
inline Config preset_config(const std::string& preset, bool small) {
  Config c = Config::load(preset);
  if (small) {
    for (const char* kv : {"vocab_size=1024", "model_dim=64", "num_heads=4", "num_kv_heads=2", "rope_dims=8"})
      c.set_from_string(kv);
    if (c.get_int("bigram_vocab_size") > 0) c.set_from_string("bigram_dim=16");
    if (c.get_bool("ve_enabled")) c.set_from_string("ve_dim=16");
  }
  return c;
}

inline ParamLayout preset_layout(const Config& c) { return ParamLayout(param_specs(ModelConfig::from_config(c))); }

}  // namespace pgolf::test
