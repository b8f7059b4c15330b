#include "core/tensor.h"

#include <algorithm>

#include "core/half.h"

namespace pgolf {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  fail("bad dtype {}", static_cast<int>(t));
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::U16: return "U16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

DType dtype_from_name(const std::string& n) {
  static const std::pair<const char*, DType> table[] = {
      {"F64", DType::F64}, {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16}, {"U16", DType::U16},
      {"I8", DType::I8},   {"U8", DType::U8},   {"BOOL", DType::BOOL}};
  for (auto& [name, t] : table)
    if (n == name) return t;
  fail("unsupported tensor dtype '{}' (expected one of F64 F32 F16 BF16 I64 I32 I16 U16 I8 U8 BOOL)", n);
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) {
    PG_CHECK(d >= 0, "negative dimension in shape {}", shape_str(s));
    n *= d;
  }
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

template <typename Out>
static std::vector<Out> convert_all(const HostTensor& t) {
  size_t n = static_cast<size_t>(t.numel());
  std::vector<Out> out(n);
  const uint8_t* p = t.bytes.data();
  auto load = [&](auto tag) {
    using T = decltype(tag);
    const T* q = reinterpret_cast<const T*>(p);
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(q[i]);
  };
  switch (t.dtype) {
    case DType::F64: load(double{}); break;
    case DType::F32: load(float{}); break;
    case DType::I64: load(int64_t{}); break;
    case DType::I32: load(int32_t{}); break;
    case DType::I16: load(int16_t{}); break;
    case DType::U16: load(uint16_t{}); break;
    case DType::I8: load(int8_t{}); break;
    case DType::U8: case DType::BOOL: load(uint8_t{}); break;
    case DType::F16: {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(f16_bits_to_f32(q[i]));
      break;
    }
    case DType::BF16: {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(bf16_bits_to_f32(q[i]));
      break;
    }
  }
  return out;
}

std::vector<float> HostTensor::to_f32() const { return convert_all<float>(*this); }
std::vector<double> HostTensor::to_f64() const { return convert_all<double>(*this); }

void TensorMap::set(const std::string& name, HostTensor t) {
  if (!index_.count(name)) order_.push_back(name);
  index_[name] = std::move(t);
}

const HostTensor& TensorMap::get(const std::string& name) const {
  auto it = index_.find(name);
  PG_CHECK(it != index_.end(), "tensor '{}' not found", name);
  return it->second;
}

HostTensor& TensorMap::get(const std::string& name) {
  auto it = index_.find(name);
  PG_CHECK(it != index_.end(), "tensor '{}' not found", name);
  return it->second;
}

void TensorMap::erase(const std::string& name) {
  if (index_.erase(name)) order_.erase(std::find(order_.begin(), order_.end(), name));
}

}  // namespace pgolf
