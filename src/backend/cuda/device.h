// The CUDA device pgolf runs on: properties read once (SM count, memory, compute capability).
#pragma once

#include <cstddef>
#include <string>

namespace pgolf::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  size_t total_memory = 0;
  size_t l2_bytes = 0;
  size_t max_smem_per_block_optin = 0;
};

int device_count();  // 0 when no driver / device is present (never throws)
DeviceInfo device_info(int index);

}  // namespace pgolf::cuda
