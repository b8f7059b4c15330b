// Muon on the device (SPEC §4.2), the twin of optim/muon.h with bf16 Newton–Schulz: every matrix
// (a 2-D parameter, or one slice of a 3-D bank) is a slot in the Newton–Schulz batch of its wide
// shape and form (a shape with fewer than 4 matrices is zero-padded into a larger batch), so the 68
// Muon matrices of s691 run as three batches and the four banks of s1560 as three. One step is five
// stream-ordered phases, none of which waits for the host:
//
//   1. momentum  (a warp per row) g·clip → Nesterov momentum (fp32 buffer for matrices, bf16 for
//      banks) → optional row normalisation → update u (fp32 scratch) and Σ bf16(u)² per row
//   2. norms     (a block per slot) the Frobenius denominator bf16(bf16(‖X‖) + 1e-7) of each slot
//   3. pack      (32×32 tiles) X = bf16(bf16(u) / denominator), transposed to the wide orientation
//   4. Newton–Schulz on each batch (newton_schulz.h)
//   5. apply     (32×32 tiles, transposed back) shape scale, decoupled weight decay and the step
//
// The arithmetic of every element is optim/update_math.h's, so phases 1–3 and 5 give the CPU's bits;
// only the products' fp32 accumulation order differs from the CPU (see newton_schulz.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/newton_schulz.h"
#include "backend/cuda/step_scalars.h"

namespace pgolf::cuda {

// One Muon parameter: [slices, rows, cols] at param_offset of the parameter / gradient arrays.
struct MuonTensor {
  int64_t param_offset = 0;
  int64_t slices = 1, rows = 0, cols = 0;  // a 2-D matrix has slices = 1
  // A 3-D bank takes the banked Parallel-Muon numerics (bf16 gradient and momentum, c·(A·A), the
  // shape scale on the lr); a matrix the per-matrix ones (fp32 momentum, (c·A)·A, scale on the update).
  bool bank = false;
};

// Device tables of the kernels. The rows of one tensor (all its slices), for phase 1:
struct MuonRowSpan {
  int64_t row_begin;        // index of the tensor's first row among all Muon rows
  int64_t param_offset;     // in params / grads
  int64_t update_offset;    // in the u scratch
  int64_t momentum_offset;  // in the fp32 or the bf16 momentum array
  int32_t cols;
  int32_t bank;  // bf16 gradient and momentum
};
// One matrix (or bank slice) in its Newton–Schulz batch, for phases 2, 3 and 5:
struct MuonSlot {
  int64_t tile_begin;     // index of its first 32×32 tile among all slots' tiles
  int64_t row_begin;      // index of its first row among all Muon rows
  int64_t update_offset;  // in the u scratch
  int64_t param_offset;   // in params
  int32_t rows, cols;     // stored orientation; rows > cols is transposed into the batch
  int32_t x_ld;           // row stride of its wide matrix in the batch (> max(rows, cols) when zero-padded)
  int32_t bank;           // shape scale on the lr (banks) or on the update (matrices)
  double shape_scale;     // sqrt(max(1, rows / cols))
  __nv_bfloat16* x;       // its wide [min, max] matrix at the top left of its batch entry
};

class GpuMuon {
 public:
  // Builds the tables, the Newton–Schulz batches and their GEMM plans (so a step can be captured
  // into a CUDA graph right away). Synchronizes the device.
  GpuMuon(const std::vector<MuonTensor>& tensors, int ns_steps, bool row_normalize);
  GpuMuon(const GpuMuon&) = delete;
  GpuMuon& operator=(const GpuMuon&) = delete;

  // The whole step: prepare, Newton–Schulz, apply.
  void enqueue(float* params, const float* grads, const OptimizerStepScalars* scalars, const GradClipState* clip,
               cudaStream_t stream);
  // The phases (public for the benchmark's breakdown): 1–3, 4, 5 above.
  void enqueue_prepare(const float* grads, const OptimizerStepScalars* scalars, const GradClipState* clip,
                       cudaStream_t stream);
  void enqueue_newton_schulz(cudaStream_t stream);
  void enqueue_apply(float* params, const OptimizerStepScalars* scalars, cudaStream_t stream);

  size_t tensor_count() const { return tensors_.size(); }
  // Momentum buffer of tensor k in fp32 (bf16 values for banks), copied synchronously.
  std::vector<float> momentum(size_t k) const;
  void set_momentum(size_t k, const std::vector<float>& values);  // banks: rounded to bf16

  size_t group_count() const { return groups_.size(); }
  BatchedNewtonSchulz& group(size_t g) { return *groups_[g]; }
  GemmRunner& gemm() { return gemm_; }
  int ns_steps() const { return ns_steps_; }

 private:
  struct TensorState {
    int64_t numel;
    int64_t momentum_offset;  // in momentum_f32_ (matrices) or momentum_bf16_ (banks)
    bool bank;
  };
  std::vector<TensorState> tensors_;
  int ns_steps_;
  bool row_normalize_;
  int64_t total_rows_ = 0, total_tiles_ = 0;

  GemmRunner gemm_;
  std::vector<std::unique_ptr<BatchedNewtonSchulz>> groups_;
  DeviceBuffer<float> momentum_f32_;
  DeviceBuffer<__nv_bfloat16> momentum_bf16_;
  DeviceBuffer<float> update_;        // u, compact over the Muon tensors in their order
  DeviceBuffer<double> row_sumsq_;    // Σ bf16(u)² of every row, after row normalisation
  DeviceBuffer<float> denominators_;  // per slot
  DeviceBuffer<MuonRowSpan> spans_;
  DeviceBuffer<MuonSlot> slots_;
};

}  // namespace pgolf::cuda
