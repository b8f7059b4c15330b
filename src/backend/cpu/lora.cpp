#include "backend/cpu/lora.h"

#include <cstddef>
#include <vector>

#include "backend/cpu/gemm.h"

namespace pgolf::cpu {

template <typename T>
void lora_forward(const T* x, const T* A, const T* B, T* h, T* y, const LoraShape& s) {
  const int64_t T_ = s.seq_len, r = s.rank, a_stride = s.a_stride > 0 ? s.a_stride : r * s.in;
  for (int64_t b = 0; b < s.rows; ++b) {
    const T* xb = x + b * T_ * s.in;
    T* hb = h + b * T_ * r;
    gemm<T>(false, true, T_, r, s.in, T(1), xb, s.in, A + b * a_stride, s.in, T(0), hb, r);
    gemm<T>(false, true, T_, s.out, r, T(1), hb, r, B + b * s.out * r, r, T(1), y + b * T_ * s.out, s.out);
  }
}

template <typename T>
void lora_backward(const T* dy, const T* x, const T* A, const T* B, const T* h, T* dx, T* dA, T* dB,
                   const LoraShape& s) {
  const int64_t T_ = s.seq_len, r = s.rank, a_stride = s.a_stride > 0 ? s.a_stride : r * s.in;
  std::vector<T> dh(static_cast<size_t>(T_ * r));
  for (int64_t b = 0; b < s.rows; ++b) {
    const T* dyb = dy + b * T_ * s.out;
    const T* Bb = B + b * s.out * r;
    const T* Ab = A + b * a_stride;
    gemm<T>(true, false, s.out, r, T_, T(1), dyb, s.out, h + b * T_ * r, r, T(1), dB + b * s.out * r, r);
    gemm<T>(false, false, T_, r, s.out, T(1), dyb, s.out, Bb, r, T(0), dh.data(), r);
    gemm<T>(true, false, r, s.in, T_, T(1), dh.data(), r, x + b * T_ * s.in, s.in, T(1), dA + b * a_stride, s.in);
    if (dx) gemm<T>(false, false, T_, s.in, r, T(1), dh.data(), r, Ab, s.in, T(1), dx + b * T_ * s.in, s.in);
  }
}

template void lora_forward<float>(const float*, const float*, const float*, float*, float*, const LoraShape&);
template void lora_forward<double>(const double*, const double*, const double*, double*, double*, const LoraShape&);
template void lora_backward<float>(const float*, const float*, const float*, const float*, const float*, float*,
                                   float*, float*, const LoraShape&);
template void lora_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                    double*, double*, double*, const LoraShape&);

}  // namespace pgolf::cpu
