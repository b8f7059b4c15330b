#include "backend/cuda/tensor_map.h"

#include <cudaTypedefs.h>

#include "backend/cuda/check.h"

namespace pgolf::cuda {
namespace {

// cuTensorMapEncodeTiled of the driver, found through the runtime (nothing more to link).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    PG_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status));
    PG_CUDA_REQUIRE(status == cudaDriverEntryPointSuccess && fn != nullptr,
                    "tensor maps: the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

}  // namespace

CUtensorMap swizzled_tensor_map(const __nv_bfloat16* base, uint64_t inner, uint64_t outer, uint32_t box_outer) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t row_bytes[1] = {inner * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {64, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(base), dims, row_bytes, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  PG_CUDA_REQUIRE(result == CUDA_SUCCESS, "tensor maps: cuTensorMapEncodeTiled rejected a matrix");
  return map;
}

}  // namespace pgolf::cuda
