#include "backend/cuda/check.h"
#include "backend/cuda/step_scalars.h"

namespace pgolf::cuda {
namespace {

__global__ void store_step_scalars(OptimizerStepScalars* device, OptimizerStepScalars value) { *device = value; }

}  // namespace

void write_step_scalars(OptimizerStepScalars* device, const OptimizerStepScalars& value, cudaStream_t stream) {
  store_step_scalars<<<1, 1, 0, stream>>>(device, value);
  PG_CUDA_LAUNCH_CHECK();
}

}  // namespace pgolf::cuda
