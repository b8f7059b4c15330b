// Round-to-nearest quantizers with one scale per row (SPEC 5.2-5.5), each reproducing its reference
// bit for bit: w / scale is one fp32 division, rounding is half-to-even (torch.round), scales are
// rounded to fp16 where the reference does so before computing the codes.
//
// Every function takes the fp32 values of one tensor and its shape. 2-D tensors [rows, cols] get one
// scale per row; tensors of any other rank get one scale for the whole tensor, as in the references.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"

namespace pgolf {

struct ScaledCodes {
  std::vector<int8_t> codes;  // one code per element, row-major, same shape as the tensor
  HostTensor scale;           // F16 [rows] for 2-D tensors; a 0-dim F16 or F32 scalar otherwise
};

// Baseline int8 (SPEC 5.2) and its s600 int6 variant: each row is clipped at its 0.9999984 quantile
// c, scale = max(c / levels, 1 / levels) in fp32, codes = clamp(round(clip(w) / scale)) computed with
// that fp32 scale; the stored scale is then rounded to fp16 (the codes are not recomputed).
// Baseline: levels 127, codes [-127, 127]. s600: levels 31, codes [-31, 30].
// Non-2-D tensors: one quantile over the tensor, an fp32 scale c / levels (1 when c = 0).
ScaledCodes quantize_percentile_clip(std::span<const float> w, const Shape& shape, int levels, int code_min,
                                     int code_max);

// Int6 per-row row-max (SPEC 5.3): scale = fp16(max(rowmax / clip_range, scale_floor)),
// codes = clamp(round(w / scale), code_min, clip_range). X4/PRoPE: floor 1/31; I6: floor 1e-12.
ScaledCodes quantize_rowmax(std::span<const float> w, const Shape& shape, int clip_range, int code_min,
                            float scale_floor);

// GPTQ-lite (s691, SPEC 5.4): five clip candidates (row quantiles 0.999, 0.9995, 0.9999, 0.99999 and the
// row max), scale = fp16(max(c / clip_range, 1 / clip_range)), codes in [-clip_range, clip_range]; the
// candidate with the smallest mean squared error over the whole matrix wins (ties keep the earlier).
// Non-2-D tensors: scale = fp16(amax / clip_range) (1 when amax = 0).
ScaledCodes quantize_gptq_lite(std::span<const float> w, const Shape& shape, int clip_range);

// s562's per-row clip search (SPEC 5.5): the same five candidates, scale =
// max(fp16(max(c / clip_range, 1e-12)), fp16 smallest normal), codes in [-(clip_range + 1), clip_range];
// each row keeps the candidate with its own smallest squared error (ties keep the earlier).
// clip_range 15 = int5 (MLP), 31 = int6. Non-2-D tensors: scale = fp16(max(amax / clip_range, 1e-12)).
ScaledCodes quantize_row_search(std::span<const float> w, const Shape& shape, int clip_range);

// q * scale row-wise in fp32 (what every reference dequantizer computes).
std::vector<float> dequantize_codes(std::span<const int8_t> codes, const HostTensor& scale, const Shape& shape);

// The per-row fp32 scales of a scale tensor (F16 or F32; a scalar gives one value).
std::vector<float> scale_values(const HostTensor& scale);

// Rows of a tensor for per-row quantization: shape[0] for 2-D tensors, 1 otherwise.
int64_t quant_rows(const Shape& shape);

// torch.clamp(torch.round(x), lo, hi).to(int8): round half to even; +-inf (a zero fp16 scale) clamp to
// the range's ends, NaN (0 / 0) gives 0.
int8_t round_to_code(float x, int lo, int hi);

}  // namespace pgolf
