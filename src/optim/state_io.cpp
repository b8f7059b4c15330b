#include "optim/state_io.h"

#include <algorithm>

namespace pgolf::optim {

void put_f32(TensorMap& out, const std::string& name, const Shape& shape, std::span<const float> values) {
  out.set(name, HostTensor::from<float>(shape, values));
}

void get_f32(const TensorMap& in, const std::string& name, const Shape& shape, std::span<float> values,
             const std::string& what) {
  PG_CHECK(in.has(name), "{}: state tensor '{}' is missing", what, name);
  const HostTensor& t = in.get(name);
  PG_CHECK(t.dtype == DType::F32, "{}: state tensor '{}' is {}, expected F32", what, name, dtype_name(t.dtype));
  PG_CHECK(t.shape == shape, "{}: state tensor '{}' has shape {}, expected {}", what, name, shape_str(t.shape),
           shape_str(shape));
  auto src = t.as<float>();
  std::copy(src.begin(), src.end(), values.begin());
}

void put_i64(TensorMap& out, const std::string& name, int64_t value) {
  out.set(name, HostTensor::from<int64_t>({}, std::span<const int64_t>(&value, 1)));
}

int64_t get_i64(const TensorMap& in, const std::string& name, const std::string& what) {
  PG_CHECK(in.has(name), "{}: state tensor '{}' is missing", what, name);
  const HostTensor& t = in.get(name);
  PG_CHECK(t.dtype == DType::I64 && t.numel() == 1, "{}: state tensor '{}' must be one I64 value, got {} {}", what,
           name, dtype_name(t.dtype), shape_str(t.shape));
  return t.as<int64_t>()[0];
}

}  // namespace pgolf::optim
