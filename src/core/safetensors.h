// safetensors read/write: 8-byte little-endian header length, JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, raw data.
// Files written here load in PyTorch's `safetensors.torch.load_file` and vice versa.
#pragma once

#include <map>
#include <string>

#include "core/fs.h"
#include "core/tensor.h"

namespace pgolf {

using Metadata = std::map<std::string, std::string>;

// Reads and validates every tensor (offsets inside the file, sizes matching dtype x shape, no
// overlaps). Throws with the file name and the offending entry on any inconsistency.
TensorMap load_safetensors(const fs::path& path, Metadata* metadata = nullptr);
TensorMap parse_safetensors(std::span<const uint8_t> bytes, const std::string& what, Metadata* metadata = nullptr);

// Serializes in the map's order; written atomically.
std::vector<uint8_t> serialize_safetensors(const TensorMap& tensors, const Metadata& metadata = {});
void save_safetensors(const fs::path& path, const TensorMap& tensors, const Metadata& metadata = {});

}  // namespace pgolf
