// The attention kernels' two exponentials, evaluated on the device for a test: the multi-function
// unit's (exp2_approx) and the FMA pipes' (exp2_poly), attention_common.cuh.
#pragma once

#include <vector>

namespace pgolf::test {

struct Exp2Values {
  std::vector<float> approx, poly;
};

// Both exponentials of every x, computed by one kernel.
Exp2Values exp2_values_device(const std::vector<float>& x);

}  // namespace pgolf::test
