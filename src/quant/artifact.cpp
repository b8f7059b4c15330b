#include "quant/artifact.h"

#include <zlib.h>

#include <bit>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "quant/banks.h"
#include "quant/int6_pack.h"

namespace pgolf {

static_assert(std::endian::native == std::endian::little, "the artifact format is little-endian");

namespace {

using json = nlohmann::json;

constexpr char kMagic[8] = {'P', 'G', 'O', 'L', 'F', 'A', 'R', 'T'};
constexpr size_t kFixedHeader = 40;
constexpr size_t kTrailer = 4;

uint32_t crc32_of(std::span<const uint8_t> b) {
  uLong crc = crc32(0L, Z_NULL, 0);
  // zlib takes uInt lengths; feed in chunks so files above 4 GiB would work too.
  for (size_t off = 0; off < b.size(); off += 1u << 30) {
    const size_t n = std::min<size_t>(b.size() - off, 1u << 30);
    crc = crc32(crc, b.data() + off, static_cast<uInt>(n));
  }
  return static_cast<uint32_t>(crc);
}

template <typename T>
void put(std::vector<uint8_t>& out, size_t at, T v) {
  std::memcpy(out.data() + at, &v, sizeof(T));
}
template <typename T>
T get(std::span<const uint8_t> in, size_t at) {
  T v;
  std::memcpy(&v, in.data() + at, sizeof(T));
  return v;
}

void append(std::vector<uint8_t>& out, std::span<const uint8_t> b) { out.insert(out.end(), b.begin(), b.end()); }

std::span<const uint8_t> code_bytes_of(const std::vector<int8_t>& codes) {
  return {reinterpret_cast<const uint8_t*>(codes.data()), codes.size()};
}

json range(size_t offset, size_t bytes) { return json{{"offset", offset}, {"bytes", bytes}}; }

// Reads [offset, offset + bytes) of a section, checking that it lies inside it.
std::span<const uint8_t> section_slice(std::span<const uint8_t> section, const json& r, const std::string& what,
                                       const std::string& tensor, const char* section_name, size_t expected_bytes) {
  const size_t off = r.at("offset").get<size_t>(), n = r.at("bytes").get<size_t>();
  PG_CHECK(off <= section.size() && n <= section.size() - off,
           "{}: tensor '{}': {} range [{}, {}) lies outside the {}-byte section", what, tensor, section_name, off,
           off + n, section.size());
  PG_CHECK(n == expected_bytes, "{}: tensor '{}': {} has {} bytes, its shape and dtype need {}", what, tensor,
           section_name, n, expected_bytes);
  return section.subspan(off, n);
}

HostTensor tensor_from_bytes(DType dtype, Shape shape, std::span<const uint8_t> bytes) {
  HostTensor t(dtype, std::move(shape));
  std::memcpy(t.bytes.data(), bytes.data(), bytes.size());
  return t;
}

}  // namespace

std::vector<uint8_t> serialize_artifact(const Artifact& a, ArtifactSizes* sizes) {
  std::vector<uint8_t> codes, scales, passthrough;
  json tensors = json::array();
  for (const auto& t : a.model.tensors) {
    const TensorPlan& p = t.plan;
    json e = {{"name", p.name},         {"category", p.category}, {"method", quant_method_name(p.method)},
              {"label", p.label},       {"bits", p.bits},         {"dtype", dtype_name(p.dtype)},
              {"shape", p.shape}};
    if (p.method == QuantMethod::Passthrough) {
      e["passthrough"] = range(passthrough.size(), t.passthrough.bytes.size());
      e["passthrough"]["dtype"] = dtype_name(t.passthrough.dtype);
      append(passthrough, t.passthrough.bytes);
    } else {
      if (p.packed) {
        const auto packed = pack_int6(t.codes);
        e["codes"] = range(codes.size(), packed.size());
        append(codes, packed);
      } else {
        e["codes"] = range(codes.size(), t.codes.size());
        append(codes, code_bytes_of(t.codes));
      }
      e["codes"]["encoding"] = p.packed ? "int6_packed" : "int8";
      e["scale"] = range(scales.size(), t.scale.bytes.size());
      e["scale"]["dtype"] = dtype_name(t.scale.dtype);
      e["scale"]["shape"] = t.scale.shape;
      append(scales, t.scale.bytes);
    }
    tensors.push_back(std::move(e));
  }
  json pruned = json::array();
  for (const auto& r : a.model.pruned)
    pruned.push_back({{"name", r.name}, {"threshold", r.threshold}, {"zeroed", r.zeroed}, {"numel", r.numel}});
  const json header = {{"format", "pgolf-artifact"},
                       {"preset", a.preset},
                       {"scheme", a.scheme},
                       {"compressor", a.compression.name()},
                       {"config", a.config_toml},
                       {"checkpoint_names", a.checkpoint_names},
                       {"bank_layers", a.bank_layers},
                       {"pruned", pruned},
                       {"sections", {{"codes", codes.size()}, {"scales", scales.size()}, {"passthrough", passthrough.size()}}},
                       {"tensors", tensors}};
  const std::string header_text = header.dump();

  std::vector<uint8_t> payload(4);
  put<uint32_t>(payload, 0, static_cast<uint32_t>(header_text.size()));
  append(payload, {reinterpret_cast<const uint8_t*>(header_text.data()), header_text.size()});
  append(payload, codes);
  append(payload, scales);
  append(payload, passthrough);

  const auto compressed = compress_bytes(payload, a.compression);
  std::vector<uint8_t> file(kFixedHeader);
  std::memcpy(file.data(), kMagic, 8);
  put<uint32_t>(file, 8, kArtifactVersion);
  file[12] = static_cast<uint8_t>(a.compression.kind);
  file[13] = a.compression.extreme ? 1 : 0;
  file[14] = static_cast<uint8_t>(a.compression.shuffle_stride);
  file[15] = 0;
  put<int32_t>(file, 16, a.compression.level);
  put<uint64_t>(file, 20, payload.size());
  put<uint32_t>(file, 28, crc32_of(payload));
  put<uint64_t>(file, 32, compressed.size());
  append(file, compressed);
  const uint32_t file_crc = crc32_of(file);
  file.resize(file.size() + kTrailer);
  put<uint32_t>(file, file.size() - kTrailer, file_crc);
  if (sizes) *sizes = {file.size(), payload.size(), header_text.size(), codes.size(), scales.size(), passthrough.size()};
  return file;
}

Artifact parse_artifact(std::span<const uint8_t> file, const std::string& what, ArtifactSizes* sizes) {
  PG_CHECK(file.size() >= kFixedHeader + kTrailer,
           "{}: truncated artifact: {} bytes, the fixed header and checksum alone take {}", what, file.size(),
           kFixedHeader + kTrailer);
  PG_CHECK(std::memcmp(file.data(), kMagic, 8) == 0, "{}: not a pgolf artifact (the file does not start with \"PGOLFART\")",
           what);
  const uint32_t version = get<uint32_t>(file, 8);
  PG_CHECK(version == kArtifactVersion, "{}: artifact format version {}, this pgolf reads version {}", what, version,
           kArtifactVersion);
  const uint64_t compressed_size = get<uint64_t>(file, 32);
  PG_CHECK(compressed_size <= file.size() && file.size() - kFixedHeader - kTrailer == compressed_size,
           "{}: truncated or padded artifact: the header announces {} compressed bytes, so {} bytes in all, but the "
           "file has {}",
           what, compressed_size, kFixedHeader + compressed_size + kTrailer, file.size());
  const uint32_t stored_file_crc = get<uint32_t>(file, file.size() - kTrailer);
  const uint32_t file_crc = crc32_of(file.first(file.size() - kTrailer));
  PG_CHECK(stored_file_crc == file_crc, "{}: damaged artifact: file checksum {:08x}, stored {:08x}", what, file_crc,
           stored_file_crc);

  Artifact a;
  PG_CHECK(file[12] <= static_cast<uint8_t>(Compressor::Brotli), "{}: unknown compressor id {}", what, file[12]);
  a.compression.kind = static_cast<Compressor>(file[12]);
  a.compression.extreme = file[13] != 0;
  a.compression.shuffle_stride = file[14];
  a.compression.level = get<int32_t>(file, 16);
  const uint64_t payload_size = get<uint64_t>(file, 20);
  const auto payload =
      decompress_bytes(file.subspan(kFixedHeader, compressed_size), a.compression, payload_size, what);
  const uint32_t payload_crc = crc32_of(payload);
  PG_CHECK(payload_crc == get<uint32_t>(file, 28), "{}: damaged artifact: payload checksum {:08x}, stored {:08x}", what,
           payload_crc, get<uint32_t>(file, 28));

  const std::span<const uint8_t> pl(payload);
  PG_CHECK(pl.size() >= 4, "{}: payload of {} bytes has no header", what, pl.size());
  const uint32_t header_len = get<uint32_t>(pl, 0);
  PG_CHECK(header_len <= pl.size() - 4, "{}: header length {} exceeds the {}-byte payload", what, header_len, pl.size());
  try {
    const json h = json::parse(pl.begin() + 4, pl.begin() + 4 + header_len);
    PG_CHECK(h.at("format") == "pgolf-artifact", "{}: header format is {}, expected \"pgolf-artifact\"", what,
             h.at("format").dump());
    a.preset = h.at("preset").get<std::string>();
    a.scheme = h.at("scheme").get<std::string>();
    a.config_toml = h.at("config").get<std::string>();
    a.checkpoint_names = h.at("checkpoint_names").get<std::vector<std::string>>();
    a.bank_layers = h.at("bank_layers").get<int64_t>();
    for (const auto& r : h.at("pruned"))
      a.model.pruned.push_back({r.at("name").get<std::string>(), r.at("threshold").get<float>(),
                                r.at("zeroed").get<int64_t>(), r.at("numel").get<int64_t>()});
    const json& sec = h.at("sections");
    const size_t n_codes = sec.at("codes").get<size_t>(), n_scales = sec.at("scales").get<size_t>(),
                 n_pass = sec.at("passthrough").get<size_t>();
    const size_t body = pl.size() - 4 - header_len;
    PG_CHECK(n_codes <= body && n_scales <= body - n_codes && n_pass == body - n_codes - n_scales,
             "{}: sections of {} + {} + {} bytes do not fill the {}-byte payload body", what, n_codes, n_scales, n_pass,
             body);
    const auto codes = pl.subspan(4 + header_len, n_codes);
    const auto scales = pl.subspan(4 + header_len + n_codes, n_scales);
    const auto pass = pl.subspan(4 + header_len + n_codes + n_scales, n_pass);

    for (const auto& e : h.at("tensors")) {
      QuantizedTensor t;
      TensorPlan& p = t.plan;
      p.name = e.at("name").get<std::string>();
      p.category = e.at("category").get<std::string>();
      p.method = quant_method_from_name(e.at("method").get<std::string>());
      p.label = e.at("label").get<std::string>();
      p.bits = e.at("bits").get<int>();
      p.dtype = dtype_from_name(e.at("dtype").get<std::string>());
      p.shape = e.at("shape").get<Shape>();
      const size_t numel = static_cast<size_t>(shape_numel(p.shape));
      for (const auto& q : a.model.tensors)
        PG_CHECK(q.plan.name != p.name, "{}: tensor '{}' appears twice", what, p.name);
      if (p.method == QuantMethod::Passthrough) {
        const json& r = e.at("passthrough");
        p.stored_dtype = dtype_from_name(r.at("dtype").get<std::string>());
        t.passthrough = tensor_from_bytes(
            p.stored_dtype, p.shape,
            section_slice(pass, r, what, p.name, "passthrough", numel * dtype_size(p.stored_dtype)));
      } else {
        PG_CHECK(p.bits >= 2 && p.bits <= 8, "{}: tensor '{}' has {} bits", what, p.name, p.bits);
        const json& c = e.at("codes");
        const std::string enc = c.at("encoding").get<std::string>();
        PG_CHECK(enc == "int8" || enc == "int6_packed", "{}: tensor '{}': unknown code encoding '{}'", what, p.name, enc);
        p.packed = enc == "int6_packed";
        const auto cb = section_slice(codes, c, what, p.name, "codes", p.packed ? packed_int6_bytes(numel) : numel);
        if (p.packed) {
          t.codes = unpack_int6(cb, numel);
        } else {
          t.codes.resize(numel);
          std::memcpy(t.codes.data(), cb.data(), numel);
        }
        const json& s = e.at("scale");
        const DType sd = dtype_from_name(s.at("dtype").get<std::string>());
        const Shape ss = s.at("shape").get<Shape>();
        PG_CHECK(ss == (p.shape.size() == 2 ? Shape{p.shape[0]} : Shape{}),
                 "{}: tensor '{}' of shape {} has scales of shape {}", what, p.name, shape_str(p.shape), shape_str(ss));
        t.scale = tensor_from_bytes(
            sd, ss, section_slice(scales, s, what, p.name, "scales", static_cast<size_t>(shape_numel(ss)) * dtype_size(sd)));
      }
      a.model.tensors.push_back(std::move(t));
    }
  } catch (const json::exception& e) {
    fail("{}: malformed artifact header: {}", what, e.what());
  }
  if (sizes) {
    *sizes = {file.size(), payload.size(), header_len, 0, 0, 0};
    for (const auto& t : a.model.tensors) {
      if (t.plan.method == QuantMethod::Passthrough) {
        sizes->passthrough_bytes += t.passthrough.bytes.size();
      } else {
        sizes->codes_bytes += t.plan.packed ? packed_int6_bytes(t.codes.size()) : t.codes.size();
        sizes->scales_bytes += t.scale.bytes.size();
      }
    }
  }
  return a;
}

size_t write_artifact(const fs::path& path, const Artifact& a, ArtifactSizes* sizes) {
  const auto bytes = serialize_artifact(a, sizes);
  write_file_atomic(path, bytes);
  return bytes.size();
}

Artifact read_artifact(const fs::path& path, ArtifactSizes* sizes) {
  const auto bytes = read_file(path);
  return parse_artifact(bytes, path.string(), sizes);
}

bool is_artifact_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  char head[8] = {};
  f.read(head, 8);
  return f.gcount() == 8 && std::memcmp(head, kMagic, 8) == 0;
}

TensorMap artifact_weights(const Artifact& a) {
  TensorMap w = dequantize_model(a.model);
  if (a.bank_layers > 0) w = rebank(w, a.bank_layers);
  TensorMap out;
  for (const auto& name : a.checkpoint_names) {
    PG_CHECK(w.has(name), "artifact (preset {}): checkpoint tensor '{}' is not in the artifact", a.preset, name);
    out.set(name, w.get(name));
  }
  PG_CHECK(out.size() == w.size(), "artifact (preset {}): {} tensors, but the checkpoint order lists {}", a.preset,
           w.size(), out.size());
  return out;
}

}  // namespace pgolf
