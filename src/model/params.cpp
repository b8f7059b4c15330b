#include "model/params.h"

namespace pgolf {

ParamLayout::ParamLayout(std::vector<ParamSpec> specs) : specs_(std::move(specs)) {
  offsets_.reserve(specs_.size());
  for (size_t i = 0; i < specs_.size(); ++i) {
    PG_CHECK(!index_.count(specs_[i].name), "duplicate parameter name '{}'", specs_[i].name);
    index_[specs_[i].name] = i;
    offsets_.push_back(total_);
    count_ += specs_[i].numel();
    total_ += (specs_[i].numel() + kParamAlignFloats - 1) / kParamAlignFloats * kParamAlignFloats;
  }
}

size_t ParamLayout::index_of(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::string known;
    for (size_t i = 0; i < specs_.size() && i < 8; ++i) known += " " + specs_[i].name;
    fail("no parameter named '{}' (the model has {} tensors:{} ...)", name, specs_.size(), known);
  }
  return it->second;
}

template <typename T>
TensorMap ParamSet<T>::to_tensors() const {
  TensorMap out;
  for (size_t i = 0; i < layout_.size(); ++i)
    out.set(layout_.spec(i).name, HostTensor::from<T>(layout_.spec(i).shape, (*this)[i]));
  return out;
}

template <typename T>
void ParamSet<T>::load_tensors(const TensorMap& t, const std::string& what, bool strict) {
  for (size_t i = 0; i < layout_.size(); ++i) {
    const ParamSpec& s = layout_.spec(i);
    PG_CHECK(t.has(s.name), "{}: parameter '{}' is missing", what, s.name);
    const HostTensor& h = t.get(s.name);
    PG_CHECK(h.shape == s.shape, "{}: parameter '{}' has shape {}, the model expects {}", what, s.name,
             shape_str(h.shape), shape_str(s.shape));
    PG_CHECK(h.dtype == DType::F32 || h.dtype == DType::F64 || h.dtype == DType::F16 || h.dtype == DType::BF16,
             "{}: parameter '{}' has non-float dtype {}", what, s.name, dtype_name(h.dtype));
    auto v = h.to_f64();
    auto dst = (*this)[i];
    for (size_t k = 0; k < dst.size(); ++k) dst[k] = static_cast<T>(v[k]);
  }
  if (strict)
    for (auto& n : t.names())
      PG_CHECK(layout_.has(n), "{}: tensor '{}' is not a parameter of this model", what, n);
}

template class ParamSet<float>;
template class ParamSet<double>;

}  // namespace pgolf
