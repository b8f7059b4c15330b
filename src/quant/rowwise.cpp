#include "quant/rowwise.h"

#include <algorithm>
#include <cmath>

#include "core/half.h"
#include "quant/quantile.h"

namespace pgolf {

namespace {

// The clip candidates shared by GPTQ-lite and s562's search: four row quantiles, then the row max.
constexpr float kClipQuantiles[] = {0.999f, 0.9995f, 0.9999f, 0.99999f};
constexpr int kNumClipCandidates = 5;

// Tensors smaller than this are quantized on one thread: waking a thread team costs more than the work
// (and much more when the machine is busy).
constexpr int64_t kParallelMinElements = 1 << 18;

float candidate_clip(std::span<const float> sorted_abs_row, int k) {
  return k < 4 ? quantile_sorted(sorted_abs_row, kClipQuantiles[k]) : sorted_abs_row.back();
}

HostTensor f16_tensor(Shape shape, std::span<const float> values) {
  HostTensor t(DType::F16, std::move(shape));
  auto* bits = reinterpret_cast<uint16_t*>(t.bytes.data());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = f32_to_f16_bits(values[i]);
  return t;
}

struct Rows {
  int64_t rows, cols;
};
Rows rows_of(const Shape& shape, size_t numel) {
  if (shape.size() == 2) return {shape[0], shape[1]};
  return {1, static_cast<int64_t>(numel)};
}

// Codes of one row for a given scale, and the row's squared reconstruction error (fp32 terms, fp64 sum).
double quantize_row(std::span<const float> w, float scale, int lo, int hi, int8_t* codes) {
  double err = 0.0;
  for (size_t j = 0; j < w.size(); ++j) {
    codes[j] = round_to_code(w[j] / scale, lo, hi);
    const float d = w[j] - static_cast<float>(codes[j]) * scale;
    err += static_cast<double>(d) * d;
  }
  return err;
}

float max_abs(std::span<const float> w) {
  float m = 0.0f;
  for (float x : w) m = std::max(m, std::fabs(x));
  return m;
}

// A tensor that is not 2-D: one fp16 scale `scale16` for every element.
ScaledCodes per_tensor_f16(std::span<const float> w, float scale16, int lo, int hi) {
  ScaledCodes out;
  out.codes.resize(w.size());
  quantize_row(w, scale16, lo, hi, out.codes.data());
  out.scale = f16_tensor({}, std::span<const float>(&scale16, 1));
  return out;
}

}  // namespace

int64_t quant_rows(const Shape& shape) { return shape.size() == 2 ? shape[0] : 1; }

int8_t round_to_code(float x, int lo, int hi) {
  const float r = std::nearbyint(x);
  if (std::isnan(r)) return 0;
  return static_cast<int8_t>(std::min(std::max(r, static_cast<float>(lo)), static_cast<float>(hi)));
}

ScaledCodes quantize_percentile_clip(std::span<const float> w, const Shape& shape, int levels, int code_min,
                                     int code_max) {
  // INT8_CLIP_Q = 99.99984 / 100.0 in Python, handed to torch.quantile as an fp32 tensor.
  const float clip_q = static_cast<float>(99.99984 / 100.0);
  const float flevels = static_cast<float>(levels);
  ScaledCodes out;
  out.codes.resize(w.size());
  if (shape.size() != 2) {
    const float clip = w.empty() ? 0.0f : quantile_sorted(sorted_abs(w), clip_q);
    // Python: clip_abs / levels in double, stored as an fp32 tensor.
    const float scale = clip > 0.0f ? static_cast<float>(static_cast<double>(clip) / levels) : 1.0f;
    for (size_t i = 0; i < w.size(); ++i)
      out.codes[i] = round_to_code(std::max(std::min(w[i], clip), -clip) / scale, code_min, code_max);
    out.scale = HostTensor::from<float>({}, std::span<const float>(&scale, 1));
    return out;
  }
  const auto [rows, cols] = rows_of(shape, w.size());
  std::vector<float> scales(static_cast<size_t>(rows));
  const float floor = static_cast<float>(1.0 / levels);
#pragma omp parallel for schedule(dynamic, 16) if (rows * cols >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    auto row = w.subspan(static_cast<size_t>(r * cols), static_cast<size_t>(cols));
    const float clip = cols > 0 ? quantile_sorted(sorted_abs(row), clip_q) : 0.0f;
    const float scale = std::max(clip / flevels, floor);
    int8_t* codes = out.codes.data() + r * cols;
    for (int64_t j = 0; j < cols; ++j)
      codes[j] = round_to_code(std::max(std::min(row[j], clip), -clip) / scale, code_min, code_max);
    scales[r] = scale;  // rounded to fp16 only for storage
  }
  out.scale = f16_tensor({rows}, scales);
  return out;
}

ScaledCodes quantize_rowmax(std::span<const float> w, const Shape& shape, int clip_range, int code_min,
                            float scale_floor) {
  if (shape.size() != 2) {
    const double amax = max_abs(w);
    const float scale = amax > 0 ? round_to_f16(static_cast<float>(amax / clip_range)) : 1.0f;
    return per_tensor_f16(w, scale, code_min, clip_range);
  }
  const auto [rows, cols] = rows_of(shape, w.size());
  ScaledCodes out;
  out.codes.resize(w.size());
  std::vector<float> scales(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    auto row = w.subspan(static_cast<size_t>(r * cols), static_cast<size_t>(cols));
    scales[r] = round_to_f16(std::max(max_abs(row) / static_cast<float>(clip_range), scale_floor));
    quantize_row(row, scales[r], code_min, clip_range, out.codes.data() + r * cols);
  }
  out.scale = f16_tensor({rows}, scales);
  return out;
}

ScaledCodes quantize_gptq_lite(std::span<const float> w, const Shape& shape, int clip_range) {
  if (shape.size() != 2) {
    const double amax = max_abs(w);
    const float scale = amax > 0 ? round_to_f16(static_cast<float>(amax / clip_range)) : 1.0f;
    return per_tensor_f16(w, scale, -clip_range, clip_range);
  }
  const auto [rows, cols] = rows_of(shape, w.size());
  const float fcr = static_cast<float>(clip_range);
  const float floor = static_cast<float>(1.0 / clip_range);
  // scales[k][r]: fp16-rounded scale of row r under candidate k; row_err[k][r]: its squared error.
  std::vector<std::vector<float>> scales(kNumClipCandidates, std::vector<float>(static_cast<size_t>(rows)));
  std::vector<std::vector<double>> row_err(kNumClipCandidates, std::vector<double>(static_cast<size_t>(rows)));
#pragma omp parallel if (rows * cols >= kParallelMinElements)
  {
    std::vector<int8_t> scratch(static_cast<size_t>(cols));
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      auto row = w.subspan(static_cast<size_t>(r * cols), static_cast<size_t>(cols));
      const auto sorted = sorted_abs(row);
      for (int k = 0; k < kNumClipCandidates; ++k) {
        const float scale = round_to_f16(std::max(candidate_clip(sorted, k) / fcr, floor));
        scales[k][r] = scale;
        row_err[k][r] = quantize_row(row, scale, -clip_range, clip_range, scratch.data());
      }
    }
  }
  int best = 0;
  double best_err = INFINITY;
  for (int k = 0; k < kNumClipCandidates; ++k) {
    double err = 0.0;  // summed in row order: the choice does not depend on the thread count
    for (int64_t r = 0; r < rows; ++r) err += row_err[k][r];
    if (err < best_err) best = k, best_err = err;
  }
  ScaledCodes out;
  out.codes.resize(w.size());
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r)
    quantize_row(w.subspan(static_cast<size_t>(r * cols), static_cast<size_t>(cols)), scales[best][r],
                 -clip_range, clip_range, out.codes.data() + r * cols);
  out.scale = f16_tensor({rows}, scales[best]);
  return out;
}

ScaledCodes quantize_row_search(std::span<const float> w, const Shape& shape, int clip_range) {
  const float f16_tiny = 6.103515625e-05f;  // torch.finfo(torch.float16).tiny = 2^-14
  if (shape.size() != 2) {
    const double amax = max_abs(w);
    const float scale = round_to_f16(static_cast<float>(std::max(amax / clip_range, 1e-12)));
    return per_tensor_f16(w, scale, -(clip_range + 1), clip_range);
  }
  const auto [rows, cols] = rows_of(shape, w.size());
  const float fcr = static_cast<float>(clip_range);
  const float eps = 1e-12f;
  ScaledCodes out;
  out.codes.resize(w.size());
  std::vector<float> scales(static_cast<size_t>(rows));
#pragma omp parallel if (rows * cols >= kParallelMinElements)
  {
    std::vector<int8_t> scratch(static_cast<size_t>(cols));
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      auto row = w.subspan(static_cast<size_t>(r * cols), static_cast<size_t>(cols));
      int8_t* codes = out.codes.data() + r * cols;
      const auto sorted = sorted_abs(row);
      double best_err = INFINITY;
      for (int k = 0; k < kNumClipCandidates; ++k) {
        const float scale = std::max(round_to_f16(std::max(candidate_clip(sorted, k) / fcr, eps)), f16_tiny);
        const double err = quantize_row(row, scale, -(clip_range + 1), clip_range, scratch.data());
        if (err < best_err) {
          best_err = err;
          scales[r] = scale;
          std::copy(scratch.begin(), scratch.end(), codes);
        }
      }
    }
  }
  out.scale = f16_tensor({rows}, scales);
  return out;
}

std::vector<float> scale_values(const HostTensor& scale) {
  PG_CHECK(scale.dtype == DType::F16 || scale.dtype == DType::F32, "scale tensor has dtype {}, expected F16 or F32",
           dtype_name(scale.dtype));
  return scale.to_f32();
}

std::vector<float> dequantize_codes(std::span<const int8_t> codes, const HostTensor& scale, const Shape& shape) {
  const int64_t rows = quant_rows(shape);
  const auto s = scale_values(scale);
  PG_CHECK(static_cast<int64_t>(s.size()) == rows, "{} scales for a tensor of shape {} (expected {})", s.size(),
           shape_str(shape), rows);
  PG_CHECK(static_cast<int64_t>(codes.size()) == shape_numel(shape), "{} codes for a tensor of shape {}",
           codes.size(), shape_str(shape));
  const int64_t cols = rows > 0 ? static_cast<int64_t>(codes.size()) / rows : 0;
  std::vector<float> out(codes.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) out[r * cols + j] = static_cast<float>(codes[r * cols + j]) * s[r];
  return out;
}

}  // namespace pgolf
