// HostTensor: a named, typed, shaped block of bytes in host memory — the unit of file I/O
// (safetensors checkpoints, golden dumps, artifacts). Compute code works on plain typed arrays.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"

namespace pgolf {

enum class DType : uint8_t { F64, F32, F16, BF16, I64, I32, I16, U16, I8, U8, BOOL };

size_t dtype_size(DType t);
const char* dtype_name(DType t);     // safetensors spelling: "F32", "I8", ...
DType dtype_from_name(const std::string& name);  // throws on unknown names

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int16_t>() { return DType::I16; }
template <> constexpr DType dtype_of<uint16_t>() { return DType::U16; }
template <> constexpr DType dtype_of<int8_t>() { return DType::I8; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);

struct HostTensor {
  DType dtype = DType::F32;
  Shape shape;
  std::vector<uint8_t> bytes;

  HostTensor() = default;
  HostTensor(DType t, Shape s) : dtype(t), shape(std::move(s)), bytes(static_cast<size_t>(shape_numel(shape)) * dtype_size(t)) {}

  template <typename T>
  static HostTensor from(Shape s, std::span<const T> values) {
    HostTensor h(dtype_of<T>(), std::move(s));
    PG_CHECK(values.size() == static_cast<size_t>(h.numel()), "HostTensor::from: {} values for shape {}",
             values.size(), shape_str(h.shape));
    std::memcpy(h.bytes.data(), values.data(), h.bytes.size());
    return h;
  }

  int64_t numel() const { return shape_numel(shape); }

  template <typename T>
  std::span<T> as() {
    PG_CHECK(dtype == dtype_of<T>(), "tensor is {}, not the requested type", dtype_name(dtype));
    return {reinterpret_cast<T*>(bytes.data()), bytes.size() / sizeof(T)};
  }
  template <typename T>
  std::span<const T> as() const {
    PG_CHECK(dtype == dtype_of<T>(), "tensor is {}, not the requested type", dtype_name(dtype));
    return {reinterpret_cast<const T*>(bytes.data()), bytes.size() / sizeof(T)};
  }
  // Values converted to float/double whatever the stored floating or integer type is (F16/BF16 exact).
  std::vector<float> to_f32() const;
  std::vector<double> to_f64() const;
};

// An ordered collection of named tensors (order of insertion is kept: it is the file order).
class TensorMap {
 public:
  void set(const std::string& name, HostTensor t);
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const HostTensor& get(const std::string& name) const;
  HostTensor& get(const std::string& name);
  const std::vector<std::string>& names() const { return order_; }
  size_t size() const { return order_.size(); }
  void erase(const std::string& name);

 private:
  std::vector<std::string> order_;
  std::map<std::string, HostTensor> index_;
};

}  // namespace pgolf
