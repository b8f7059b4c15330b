// Compressors of the artifact payload (SPEC 5.8): zlib, zstd (libzstd), lzma (liblzma, xz container),
// brotli (libbrotli), optionally after a stride-s byte shuffle (s1560: stride 2, all bytes at even
// offsets, then all at odd offsets).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"

namespace pgolf {

enum class Compressor : uint8_t { None = 0, Zlib = 1, Zstd = 2, Lzma = 3, Brotli = 4 };

struct CompressionSpec {
  Compressor kind = Compressor::Zlib;
  int level = 9;
  bool extreme = false;   // lzma only: the "e" presets (9e)
  int shuffle_stride = 0;  // 0 = no byte shuffle

  static CompressionSpec from_config(const Config& c);
  // "zstd-22", "lzma-9e", "brotli-11+shuffle2", "zlib-9", "none".
  std::string name() const;
};

const char* compressor_name(Compressor c);
Compressor compressor_from_name(const std::string& name);

// Parses "NAME[-LEVEL[e]]" (zstd-22, lzma-6, lzma-9e, brotli-11, zlib-9, none) into the config keys
// compressor, compressor_level and compressor_extreme.
void apply_compressor_spec(Config& c, const std::string& spec);

std::vector<uint8_t> byte_shuffle(std::span<const uint8_t> data, int stride);
std::vector<uint8_t> byte_unshuffle(std::span<const uint8_t> data, int stride);

// Shuffles (if asked) and compresses.
std::vector<uint8_t> compress_bytes(std::span<const uint8_t> data, const CompressionSpec& spec);
// Inverse of compress_bytes; the result must be exactly `expected_size` bytes (errors name `what`).
std::vector<uint8_t> decompress_bytes(std::span<const uint8_t> data, const CompressionSpec& spec,
                                      size_t expected_size, const std::string& what);

}  // namespace pgolf
