#include "core/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>

namespace pgolf {

using nlohmann::json;

TensorMap parse_safetensors(std::span<const uint8_t> bytes, const std::string& what, Metadata* metadata) {
  PG_CHECK(bytes.size() >= 8, "{}: not a safetensors file ({} bytes, need at least 8)", what, bytes.size());
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes.data(), 8);
  PG_CHECK(hlen <= bytes.size() - 8, "{}: header length {} exceeds file size {}", what, hlen, bytes.size());
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(hlen));
  } catch (const std::exception& e) {
    fail("{}: bad safetensors header: {}", what, e.what());
  }
  PG_CHECK(header.is_object(), "{}: safetensors header is not a JSON object", what);
  const uint8_t* data = bytes.data() + 8 + hlen;
  const uint64_t data_size = bytes.size() - 8 - hlen;

  struct Entry {
    std::string name;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  TensorMap out;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (metadata)
        for (auto m = it.value().begin(); m != it.value().end(); ++m) (*metadata)[m.key()] = m.value().get<std::string>();
      continue;
    }
    const json& e = it.value();
    PG_CHECK(e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
             "{}: tensor '{}' lacks dtype/shape/data_offsets", what, it.key());
    HostTensor t;
    t.dtype = dtype_from_name(e["dtype"].get<std::string>());
    t.shape = e["shape"].get<Shape>();
    auto off = e["data_offsets"].get<std::vector<uint64_t>>();
    PG_CHECK(off.size() == 2 && off[0] <= off[1] && off[1] <= data_size,
             "{}: tensor '{}' has data offsets outside the data section ({} bytes)", what, it.key(), data_size);
    uint64_t expect = static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype);
    PG_CHECK(off[1] - off[0] == expect, "{}: tensor '{}' ({} {}) needs {} bytes, file gives {}", what, it.key(),
             dtype_name(t.dtype), shape_str(t.shape), expect, off[1] - off[0]);
    t.bytes.assign(data + off[0], data + off[1]);
    entries.push_back({it.key(), off[0], off[1]});
    out.set(it.key(), std::move(t));
  }
  std::sort(entries.begin(), entries.end(), [](auto& a, auto& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < entries.size(); ++i)
    PG_CHECK(entries[i].begin >= entries[i - 1].end, "{}: tensors '{}' and '{}' overlap", what, entries[i - 1].name,
             entries[i].name);
  // Keep the file's data order (the order the writer used), not the JSON object's key order.
  TensorMap ordered;
  for (auto& e : entries) ordered.set(e.name, std::move(out.get(e.name)));
  return ordered;
}

TensorMap load_safetensors(const fs::path& path, Metadata* metadata) {
  MappedFile f(path);
  return parse_safetensors(f.bytes(), path.string(), metadata);
}

std::vector<uint8_t> serialize_safetensors(const TensorMap& tensors, const Metadata& metadata) {
  json header = json::object();
  uint64_t off = 0;
  for (auto& name : tensors.names()) {
    const HostTensor& t = tensors.get(name);
    PG_CHECK(t.bytes.size() == static_cast<size_t>(t.numel()) * dtype_size(t.dtype),
             "tensor '{}' holds {} bytes, shape {} needs {}", name, t.bytes.size(), shape_str(t.shape),
             t.numel() * dtype_size(t.dtype));
    header[name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align the data section to 8 bytes
  std::vector<uint8_t> out(8 + h.size() + off);
  uint64_t hlen = h.size();
  std::memcpy(out.data(), &hlen, 8);
  std::memcpy(out.data() + 8, h.data(), h.size());
  uint8_t* p = out.data() + 8 + h.size();
  for (auto& name : tensors.names()) {
    const HostTensor& t = tensors.get(name);
    std::memcpy(p, t.bytes.data(), t.bytes.size());
    p += t.bytes.size();
  }
  return out;
}

void save_safetensors(const fs::path& path, const TensorMap& tensors, const Metadata& metadata) {
  write_file_atomic(path, serialize_safetensors(tensors, metadata));
}

}  // namespace pgolf
