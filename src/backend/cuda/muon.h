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
//
// Parallel Muon (given an active optim::ParallelMuonPlan: banks and several ranks), the twin of
// optim/muon.cpp's sharded banks: the caller reduce-scatters bank_grad_blocks() (filled by
// enqueue_pack_bank_grads: every bank's local gradient in bf16, zero-padded, packed in rank blocks)
// into bank_grad_shard(); phases 1–4 then run on this rank's slices of the banks only (their
// gradient read from the shard, their momentum kept current only there); enqueue_export_updates
// writes the orthogonalised slices into update_block(), which the caller all-gathers into
// update_gather(); phase 5 applies every slice of every bank from there. 2-D matrices keep the
// one-rank path (their gradients are averaged by the caller). The collectives are the caller's
// (gpu_optimizer.cpp), between the phases, on the same stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/cuda/arena.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/newton_schulz.h"
#include "backend/cuda/segment_copy.h"
#include "backend/cuda/step_scalars.h"
#include "optim/parallel_muon_plan.h"

namespace pgolf::cuda {

// One Muon parameter: [slices, rows, cols] at param_offset of the parameter / gradient arrays.
struct MuonTensor {
  int64_t param_offset = 0;
  int64_t slices = 1, rows = 0, cols = 0;  // a 2-D matrix has slices = 1
  // A 3-D bank takes the banked Parallel-Muon numerics (bf16 gradient and momentum, c·(A·A), the
  // shape scale on the lr); a matrix the per-matrix ones (fp32 momentum, (c·A)·A, scale on the update).
  bool bank = false;
};

// Device tables of the kernels. The rows of one tensor (all its slices, or a sharded bank's owned
// slices), for phase 1:
struct MuonRowSpan {
  int64_t row_begin;        // index of the tensor's first row among all Muon rows
  int64_t grad_offset;      // in grads, or (sharded) in the bank gradient shard
  int64_t update_offset;    // in the u scratch
  int64_t momentum_offset;  // in the fp32 or the bf16 momentum array
  int32_t cols;
  int32_t bank;     // bf16 gradient and momentum
  int32_t sharded;  // the gradient is the bf16 reduce-scattered shard (Parallel Muon)
};
// One matrix (or bank slice) and where its orthogonalised update x lives: its Newton–Schulz batch
// (phases 2, 3, 5 and the export of Parallel Muon) or the all-gathered updates (phase 5 of banks
// under Parallel Muon).
struct MuonSlot {
  int64_t tile_begin;     // index of its first 32×32 tile among its table's tiles
  int64_t row_begin;      // index of its first row among all Muon rows (phases 2, 3)
  int64_t update_offset;  // in the u scratch (phase 3)
  int64_t param_offset;   // in params (phase 5), or in update_block() (the export)
  int32_t rows, cols;     // stored orientation
  int32_t x_ld;           // row stride of x (> max(rows, cols) when zero-padded in a batch)
  int32_t x_transposed;   // x holds the matrix transposed: a tall matrix in its wide batch orientation
  int32_t bank;           // shape scale on the lr (banks) or on the update (matrices)
  double shape_scale;     // sqrt(max(1, rows / cols))
  __nv_bfloat16* x;       // its matrix at the top left of its batch entry, or in the gathered updates
};

class GpuMuon {
 public:
  // Builds the tables, the Newton–Schulz batches and their GEMM plans (so a step can be captured
  // into a CUDA graph right away). Synchronizes the device. With an active `plan` (whose banks are
  // the bank tensors, in order) the banks run Parallel Muon on this rank's slices.
  GpuMuon(const std::vector<MuonTensor>& tensors, int ns_steps, bool row_normalize,
          const optim::ParallelMuonPlan* plan = nullptr);
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

  // Parallel Muon (sharded() only; see above). The blocks hold block_values() bf16 values per rank.
  bool sharded() const { return sharded_; }
  int64_t block_values() const { return block_values_; }
  void enqueue_pack_bank_grads(const float* grads, cudaStream_t stream);  // → bank_grad_blocks()
  __nv_bfloat16* bank_grad_blocks() { return grad_blocks_.data(); }       // world blocks
  __nv_bfloat16* bank_grad_shard() { return grad_shard_.data(); }         // this rank's block
  void enqueue_export_updates(cudaStream_t stream);                       // → update_block()
  __nv_bfloat16* update_block() { return update_block_.data(); }          // this rank's block
  __nv_bfloat16* update_gather() { return update_gather_.data(); }        // world blocks
  // The bank momenta for a checkpoint: this rank's slices into update_block(), and, once the caller
  // has all-gathered it into update_gather(), every rank's slices from there into the momentum
  // buffers (whose other slices this rank never reads).
  void enqueue_pack_owned_momenta(cudaStream_t stream);
  void enqueue_unpack_gathered_momenta(cudaStream_t stream);

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
  bool sharded_ = false;
  int64_t block_values_ = 0;
  int64_t total_rows_ = 0;
  // Tiles of the three slot tables: the slots of the batches (phases 2, 3), the owned bank slices
  // (export), every slot's update (phase 5).
  int64_t batch_tiles_ = 0, export_tiles_ = 0, apply_tiles_ = 0;

  GemmRunner gemm_;
  std::vector<std::unique_ptr<BatchedNewtonSchulz>> groups_;
  DeviceBuffer<float> momentum_f32_;
  DeviceBuffer<__nv_bfloat16> momentum_bf16_;
  DeviceBuffer<float> update_;        // u, compact over the Muon tensors in their order
  DeviceBuffer<double> row_sumsq_;    // Σ bf16(u)² of every row, after row normalisation
  DeviceBuffer<float> denominators_;  // per slot
  DeviceBuffer<MuonRowSpan> spans_;
  DeviceBuffer<MuonSlot> batch_slots_, export_slots_, apply_slots_;
  // Parallel Muon: the collectives' buffers and the copies into and out of them.
  DeviceBuffer<__nv_bfloat16> grad_blocks_, grad_shard_, update_block_, update_gather_;
  SegmentCopy grads_to_blocks_, momenta_to_block_, gathered_to_momenta_;
};

}  // namespace pgolf::cuda
