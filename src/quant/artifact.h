// The pgolf artifact: a quantized model in one compressed file (what counts against the 16,000,000-byte
// cap together with the code bytes).
//
// File layout (little-endian):
//   0   8  magic "PGOLFART"
//   8   4  u32 format version (kArtifactVersion)
//   12  1  u8 compressor (Compressor), 13 u8 lzma-extreme flag, 14 u8 byte-shuffle stride, 15 u8 zero
//   16  4  i32 compressor level
//   20  8  u64 payload bytes (uncompressed)
//   28  4  u32 CRC-32 of the uncompressed payload
//   32  8  u64 compressed bytes C
//   40  C  the compressed payload
//   40+C 4 u32 CRC-32 of every byte before it
// Payload: u32 header length, the header (JSON: preset, resolved config as TOML text, scheme, tensor
// table with name, category, method, dtype, shape and section offsets), then three sections: the codes
// of all tensors, then all scales, then all passthrough tensors (like data next to like data compresses
// better).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/fs.h"
#include "quant/compress.h"
#include "quant/quantize.h"

namespace pgolf {

inline constexpr uint32_t kArtifactVersion = 1;

struct Artifact {
  std::string preset;
  std::string config_toml;  // the resolved configuration the model was packed with
  std::string scheme;       // quant_scheme
  CompressionSpec compression;
  std::vector<std::string> checkpoint_names;  // the checkpoint's parameter order (banks under their names)
  int64_t bank_layers = 0;                    // > 0: the checkpoint held parameter banks of this many layers
  QuantizedModel model;                       // tensors under the quantizer's (unbanked) names
};

// Sizes of one artifact, for reports.
struct ArtifactSizes {
  size_t file_bytes = 0;
  size_t payload_bytes = 0;  // uncompressed
  size_t header_bytes = 0;
  size_t codes_bytes = 0, scales_bytes = 0, passthrough_bytes = 0;
};

std::vector<uint8_t> serialize_artifact(const Artifact& a, ArtifactSizes* sizes = nullptr);
// Validates everything (magic, version, lengths, both checksums, the header's tables) and throws a
// message naming `what` and the problem otherwise.
Artifact parse_artifact(std::span<const uint8_t> file, const std::string& what, ArtifactSizes* sizes = nullptr);

// Writes atomically and returns the file size.
size_t write_artifact(const fs::path& path, const Artifact& a, ArtifactSizes* sizes = nullptr);
Artifact read_artifact(const fs::path& path, ArtifactSizes* sizes = nullptr);
bool is_artifact_file(const fs::path& path);  // starts with the magic

// The dequantized weights under the checkpoint's names and order (banks rebuilt).
TensorMap artifact_weights(const Artifact& a);

}  // namespace pgolf
