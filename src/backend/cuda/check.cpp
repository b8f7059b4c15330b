#include "backend/cuda/check.h"

#include "core/error.h"

namespace pgolf::cuda {

void raise_cuda_error(int code, const char* text, const char* expr, const char* file, int line) {
  fail("CUDA error {} ({}) in {} at {}:{}", code, text, expr, file, line);
}

void raise_error(const char* what, const char* file, int line) { fail("{} (at {}:{})", what, file, line); }

}  // namespace pgolf::cuda
