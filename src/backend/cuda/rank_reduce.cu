#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "backend/cuda/check.h"
#include "backend/cuda/rank_reduce.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct FloatElement {  // F32, F64 and BF16: accumulated in double
  using Acc = double;
  static __device__ double load(const void* p, size_t i) { return static_cast<double>(static_cast<const T*>(p)[i]); }
  static __device__ void store(void* p, size_t i, double v) { static_cast<T*>(p)[i] = static_cast<T>(v); }
};
template <>
struct FloatElement<__nv_bfloat16> {
  using Acc = double;
  static __device__ double load(const void* p, size_t i) {
    return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
  }
  // Through float, as the host's f32_to_bf16_bits(static_cast<float>(v)).
  static __device__ void store(void* p, size_t i, double v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <typename T>
struct IntElement {  // I32 and I64: accumulated in int64
  using Acc = int64_t;
  static __device__ int64_t load(const void* p, size_t i) { return static_cast<int64_t>(static_cast<const T*>(p)[i]); }
  static __device__ void store(void* p, size_t i, int64_t v) { static_cast<T*>(p)[i] = static_cast<T>(v); }
};

template <typename E>
__global__ void __launch_bounds__(kThreads)
    reduce_over_ranks_kernel(RankBuffers inputs, size_t offset, size_t count, void* __restrict__ out, RankReduceOp op,
                             double inv_ranks) {
  using Acc = typename E::Acc;
  for (size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * kThreads) {
    Acc acc = E::load(inputs.data[0], offset + i);
    for (int r = 1; r < inputs.ranks; ++r) {
      const Acc v = E::load(inputs.data[r], offset + i);
      acc = op == RankReduceOp::Max ? (acc < v ? v : acc) : acc + v;  // std::max(acc, v), as the host
    }
    if constexpr (std::is_floating_point_v<Acc>) {
      if (op == RankReduceOp::Avg) acc *= inv_ranks;
    }
    E::store(out, i, acc);
  }
}

template <typename E>
void launch(const RankBuffers& inputs, size_t offset, size_t count, void* out, RankReduceOp op, cudaStream_t stream) {
  const size_t blocks = (count + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  reduce_over_ranks_kernel<E><<<grid, kThreads, 0, stream>>>(inputs, offset, count, out, op,
                                                            1.0 / static_cast<double>(inputs.ranks));
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace

void reduce_over_ranks(const RankBuffers& inputs, size_t offset, size_t count, void* out, RankReduceType type,
                       RankReduceOp op, cudaStream_t stream) {
  PG_CUDA_REQUIRE(inputs.ranks >= 1 && inputs.ranks <= kMaxReduceRanks, "reduce_over_ranks: rank count out of range");
  const bool integer = type == RankReduceType::I32 || type == RankReduceType::I64;
  PG_CUDA_REQUIRE(!(integer && op == RankReduceOp::Avg), "integer all-reduce does not support Avg");
  if (count == 0) return;
  switch (type) {
    case RankReduceType::F32: return launch<FloatElement<float>>(inputs, offset, count, out, op, stream);
    case RankReduceType::F64: return launch<FloatElement<double>>(inputs, offset, count, out, op, stream);
    case RankReduceType::BF16: return launch<FloatElement<__nv_bfloat16>>(inputs, offset, count, out, op, stream);
    case RankReduceType::I32: return launch<IntElement<int32_t>>(inputs, offset, count, out, op, stream);
    case RankReduceType::I64: return launch<IntElement<int64_t>>(inputs, offset, count, out, op, stream);
  }
}

}  // namespace pgolf::cuda
