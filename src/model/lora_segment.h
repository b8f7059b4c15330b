// One adapter matrix's rows in the flat LoRA layout (model/lora.h), with no dependencies so that CUDA
// translation units can use it too.
#pragma once

#include <cstdint>

namespace pgolf {

// The leading rows of one adapter matrix in a lora_layout: rows [0, n) are the values
// [offset, offset + n·per_row) (A [rows, r, in]: per_row = r·in; B [rows, out, r]: per_row = out·r).
struct LoraRowSegment {
  int64_t offset = 0;
  int64_t per_row = 0;
};

}  // namespace pgolf
