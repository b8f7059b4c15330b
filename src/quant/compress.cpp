#include "quant/compress.h"

#include <brotli/decode.h>
#include <brotli/encode.h>
#include <lzma.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cctype>

#include "core/error.h"

namespace pgolf {

namespace {

void check_level(const CompressionSpec& s) {
  switch (s.kind) {
    case Compressor::None: break;
    case Compressor::Zlib: PG_CHECK(s.level >= 0 && s.level <= 9, "zlib level {} is outside [0, 9]", s.level); break;
    case Compressor::Zstd:
      PG_CHECK(s.level >= 1 && s.level <= ZSTD_maxCLevel(), "zstd level {} is outside [1, {}]", s.level,
               ZSTD_maxCLevel());
      break;
    case Compressor::Lzma: PG_CHECK(s.level >= 0 && s.level <= 9, "lzma preset {} is outside [0, 9]", s.level); break;
    case Compressor::Brotli:
      PG_CHECK(s.level >= 0 && s.level <= 11, "brotli quality {} is outside [0, 11]", s.level);
      break;
  }
  PG_CHECK(!s.extreme || s.kind == Compressor::Lzma, "the extreme preset exists only for lzma, not {}",
           compressor_name(s.kind));
  PG_CHECK(s.shuffle_stride == 0 || (s.shuffle_stride >= 2 && s.shuffle_stride <= 255),
           "byte shuffle stride {} must be 0 (off) or in [2, 255]", s.shuffle_stride);
}

std::vector<uint8_t> compress_raw(std::span<const uint8_t> in, const CompressionSpec& s) {
  std::vector<uint8_t> out;
  switch (s.kind) {
    case Compressor::None: return {in.begin(), in.end()};
    case Compressor::Zlib: {
      uLongf n = compressBound(static_cast<uLong>(in.size()));
      out.resize(n);
      int rc = compress2(out.data(), &n, in.data(), static_cast<uLong>(in.size()), s.level);
      PG_CHECK(rc == Z_OK, "zlib compression failed (code {})", rc);
      out.resize(n);
      return out;
    }
    case Compressor::Zstd: {
      out.resize(ZSTD_compressBound(in.size()));
      size_t n = ZSTD_compress(out.data(), out.size(), in.data(), in.size(), s.level);
      PG_CHECK(!ZSTD_isError(n), "zstd compression failed: {}", ZSTD_getErrorName(n));
      out.resize(n);
      return out;
    }
    case Compressor::Lzma: {
      out.resize(lzma_stream_buffer_bound(in.size()));
      size_t pos = 0;
      const uint32_t preset = static_cast<uint32_t>(s.level) | (s.extreme ? LZMA_PRESET_EXTREME : 0u);
      lzma_ret rc = lzma_easy_buffer_encode(preset, LZMA_CHECK_CRC64, nullptr, in.data(), in.size(), out.data(), &pos,
                                            out.size());
      PG_CHECK(rc == LZMA_OK, "lzma compression failed (code {})", static_cast<int>(rc));
      out.resize(pos);
      return out;
    }
    case Compressor::Brotli: {
      size_t n = BrotliEncoderMaxCompressedSize(in.size());
      out.resize(n);
      int ok = BrotliEncoderCompress(s.level, BROTLI_DEFAULT_WINDOW, BROTLI_MODE_GENERIC, in.size(), in.data(), &n,
                                     out.data());
      PG_CHECK(ok, "brotli compression failed");
      out.resize(n);
      return out;
    }
  }
  fail("unknown compressor {}", static_cast<int>(s.kind));
}

std::vector<uint8_t> decompress_raw(std::span<const uint8_t> in, const CompressionSpec& s, size_t expected,
                                    const std::string& what) {
  std::vector<uint8_t> out(expected);
  const char* name = compressor_name(s.kind);
  switch (s.kind) {
    case Compressor::None:
      PG_CHECK(in.size() == expected, "{}: stored payload has {} bytes, expected {}", what, in.size(), expected);
      return {in.begin(), in.end()};
    case Compressor::Zlib: {
      uLongf n = static_cast<uLongf>(expected);
      int rc = uncompress(out.data(), &n, in.data(), static_cast<uLong>(in.size()));
      PG_CHECK(rc == Z_OK && n == expected, "{}: zlib decompression failed (code {}, {} of {} bytes)", what, rc, n,
               expected);
      return out;
    }
    case Compressor::Zstd: {
      size_t n = ZSTD_decompress(out.data(), out.size(), in.data(), in.size());
      PG_CHECK(!ZSTD_isError(n), "{}: zstd decompression failed: {}", what, ZSTD_getErrorName(n));
      PG_CHECK(n == expected, "{}: zstd gave {} bytes, expected {}", what, n, expected);
      return out;
    }
    case Compressor::Lzma: {
      uint64_t memlimit = UINT64_MAX;
      size_t in_pos = 0, out_pos = 0;
      lzma_ret rc = lzma_stream_buffer_decode(&memlimit, 0, nullptr, in.data(), &in_pos, in.size(), out.data(),
                                              &out_pos, out.size());
      PG_CHECK(rc == LZMA_OK && in_pos == in.size() && out_pos == expected,
               "{}: lzma decompression failed (code {}, {} of {} bytes)", what, static_cast<int>(rc), out_pos, expected);
      return out;
    }
    case Compressor::Brotli: {
      size_t n = expected;
      BrotliDecoderResult rc = BrotliDecoderDecompress(in.size(), in.data(), &n, out.data());
      PG_CHECK(rc == BROTLI_DECODER_RESULT_SUCCESS && n == expected,
               "{}: brotli decompression failed (result {}, {} of {} bytes)", what, static_cast<int>(rc), n, expected);
      return out;
    }
  }
  fail("{}: unknown compressor {} ({})", what, static_cast<int>(s.kind), name);
}

}  // namespace

const char* compressor_name(Compressor c) {
  switch (c) {
    case Compressor::None: return "none";
    case Compressor::Zlib: return "zlib";
    case Compressor::Zstd: return "zstd";
    case Compressor::Lzma: return "lzma";
    case Compressor::Brotli: return "brotli";
  }
  return "?";
}

Compressor compressor_from_name(const std::string& name) {
  for (auto c : {Compressor::None, Compressor::Zlib, Compressor::Zstd, Compressor::Lzma, Compressor::Brotli})
    if (name == compressor_name(c)) return c;
  fail("compressor '{}' is not one of none, zlib, zstd, lzma, brotli", name);
}

CompressionSpec CompressionSpec::from_config(const Config& c) {
  CompressionSpec s;
  s.kind = compressor_from_name(c.get_string("compressor"));
  s.level = static_cast<int>(c.get_int("compressor_level"));
  s.extreme = c.get_bool("compressor_extreme");
  s.shuffle_stride = c.get_bool("byte_shuffle") ? 2 : 0;
  check_level(s);
  return s;
}

std::string CompressionSpec::name() const {
  std::string n = compressor_name(kind);
  if (kind != Compressor::None) n += fmt::format("-{}{}", level, extreme ? "e" : "");
  if (shuffle_stride) n += fmt::format("+shuffle{}", shuffle_stride);
  return n;
}

void apply_compressor_spec(Config& c, const std::string& spec) {
  const auto dash = spec.find('-');
  const std::string name = spec.substr(0, dash);
  c.set("compressor", name);
  compressor_from_name(name);  // validates the name
  c.set("compressor_extreme", false);
  if (dash == std::string::npos) return;
  std::string level = spec.substr(dash + 1);
  if (!level.empty() && level.back() == 'e') {
    c.set("compressor_extreme", true);
    level.pop_back();
  }
  PG_CHECK(!level.empty() && level.size() <= 3 && std::all_of(level.begin(), level.end(), ::isdigit),
           "compressor '{}': expected NAME[-LEVEL[e]], e.g. zstd-22, lzma-9e, brotli-11", spec);
  c.set("compressor_level", static_cast<int64_t>(std::stoi(level)));
}

std::vector<uint8_t> byte_shuffle(std::span<const uint8_t> data, int stride) {
  std::vector<uint8_t> out;
  out.reserve(data.size());
  for (int k = 0; k < stride; ++k)
    for (size_t i = static_cast<size_t>(k); i < data.size(); i += static_cast<size_t>(stride)) out.push_back(data[i]);
  return out;
}

std::vector<uint8_t> byte_unshuffle(std::span<const uint8_t> data, int stride) {
  std::vector<uint8_t> out(data.size());
  size_t src = 0;
  for (int k = 0; k < stride; ++k)
    for (size_t i = static_cast<size_t>(k); i < data.size(); i += static_cast<size_t>(stride)) out[i] = data[src++];
  return out;
}

std::vector<uint8_t> compress_bytes(std::span<const uint8_t> data, const CompressionSpec& spec) {
  check_level(spec);
  if (spec.shuffle_stride == 0) return compress_raw(data, spec);
  return compress_raw(byte_shuffle(data, spec.shuffle_stride), spec);
}

std::vector<uint8_t> decompress_bytes(std::span<const uint8_t> data, const CompressionSpec& spec,
                                      size_t expected_size, const std::string& what) {
  check_level(spec);
  auto raw = decompress_raw(data, spec, expected_size, what);
  if (spec.shuffle_stride == 0) return raw;
  return byte_unshuffle(raw, spec.shuffle_stride);
}

}  // namespace pgolf
