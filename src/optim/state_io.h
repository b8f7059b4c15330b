// Optimizer and averaging state as named checkpoint tensors: F32 arrays and I64 counters, checked
// for presence, dtype and shape on load so a checkpoint of another model or preset fails loudly.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "core/tensor.h"

namespace pgolf::optim {

void put_f32(TensorMap& out, const std::string& name, const Shape& shape, std::span<const float> values);
void get_f32(const TensorMap& in, const std::string& name, const Shape& shape, std::span<float> values,
             const std::string& what);
void put_i64(TensorMap& out, const std::string& name, int64_t value);
int64_t get_i64(const TensorMap& in, const std::string& name, const std::string& what);

}  // namespace pgolf::optim
