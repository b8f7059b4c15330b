// ParamSet: all parameters of a model in one contiguous array, in param_specs() order, with a view
// per named tensor. Gradients, optimizer moments and EMA copies use the same layout, so an optimizer
// can walk them together by offset. The CUDA engine mirrors this layout on the device.
//
// Every tensor starts at a multiple of kParamAlignFloats (256 bytes): GEMMs that write weight
// gradients in place and vectorized kernels need aligned tensor starts (a scalar such as
// bigram.scale would otherwise shift every later tensor by 4 bytes). The gaps between tensors are
// padding: zero in parameters and gradients, never read by name, and harmless to whole-array
// passes (norms, EMA, copies) as long as they stay zero.
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace pgolf {

constexpr int64_t kParamAlignFloats = 64;  // 256 bytes

class ParamLayout {
 public:
  ParamLayout() = default;
  explicit ParamLayout(std::vector<ParamSpec> specs);

  const std::vector<ParamSpec>& specs() const { return specs_; }
  size_t size() const { return specs_.size(); }
  int64_t total() const { return total_; }  // floats of the array, padding included
  int64_t count() const { return count_; }  // parameters (sum of the tensors' sizes)
  int64_t offset(size_t i) const { return offsets_[i]; }
  int64_t numel(size_t i) const { return specs_[i].numel(); }
  const ParamSpec& spec(size_t i) const { return specs_[i]; }
  size_t index_of(const std::string& name) const;  // throws with the known names if absent
  bool has(const std::string& name) const { return index_.count(name) != 0; }

 private:
  std::vector<ParamSpec> specs_;
  std::vector<int64_t> offsets_;
  std::unordered_map<std::string, size_t> index_;
  int64_t total_ = 0;
  int64_t count_ = 0;
};

template <typename T>
class ParamSet {
 public:
  ParamSet() = default;
  explicit ParamSet(ParamLayout layout) : layout_(std::move(layout)), data_(static_cast<size_t>(layout_.total())) {}

  const ParamLayout& layout() const { return layout_; }
  std::span<T> all() { return data_; }
  std::span<const T> all() const { return data_; }
  std::span<T> operator[](size_t i) {
    return {data_.data() + layout_.offset(i), static_cast<size_t>(layout_.numel(i))};
  }
  std::span<const T> operator[](size_t i) const {
    return {data_.data() + layout_.offset(i), static_cast<size_t>(layout_.numel(i))};
  }
  std::span<T> operator[](const std::string& name) { return (*this)[layout_.index_of(name)]; }
  std::span<const T> operator[](const std::string& name) const { return (*this)[layout_.index_of(name)]; }
  void zero() { std::fill(data_.begin(), data_.end(), T(0)); }

  // As safetensors-ready tensors (F32 for float, F64 for double) under the reference names.
  TensorMap to_tensors() const;
  // Loads every parameter from `t` (names and shapes must match; float types are converted).
  // Extra tensors in `t` are ignored unless `strict`; a missing one is always an error.
  void load_tensors(const TensorMap& t, const std::string& what, bool strict = false);

  template <typename U>
  ParamSet<U> cast() const {
    ParamSet<U> out(layout_);
    for (size_t i = 0; i < data_.size(); ++i) out.all()[i] = static_cast<U>(data_[i]);
    return out;
  }

 private:
  ParamLayout layout_;
  std::vector<T> data_;
};

}  // namespace pgolf
