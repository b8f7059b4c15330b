#include <algorithm>
#include <cmath>

#include "backend/cuda/muon.h"
#include "backend/cuda/reduce.cuh"
#include "optim/newton_schulz.h"
#include "optim/update_math.h"

namespace pgolf::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;  // phase 1: a warp per row
constexpr int kTile = 32;                     // phases 3 and 5: 32×32 tiles, 32×8 threads
constexpr int kTileRowsPerPass = 8;
constexpr int kTilesPerBlock = 4;

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

struct RoundBf16 {
  __device__ float operator()(float x) const { return bf16_round(x); }
};

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Index of the last table entry whose `begin` is <= idx (entries sorted by begin, the first at 0).
template <typename T>
__device__ __forceinline__ int find_entry(const T* entries, int count, int64_t idx, int64_t T::*begin) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (entries[mid].*begin <= idx)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// One row of `cols` values, one warp: momentum and Nesterov update (update_math.h), then the
// optional row normalisation u ← round(u / round(max(‖u‖₂, 1e-7))) (norm in fp64, as the CPU).
// Returns Σ bf16(u)² of the final u (the Frobenius norm's share of this row), on every lane.
template <typename Round, typename Grad, typename Momentum>
__device__ double momentum_row(const Grad* grad, Momentum* momentum, float* update, int cols, float mu,
                               float clip_coef, bool row_normalize, Round round) {
  const int lane = threadIdx.x % 32;
  double sum_sq = 0.0;
  for (int j = lane; j < cols; j += 32) {
    float buf = load_float(momentum + j);
    const float u =
        optim::muon_nesterov(round(optim::mul_rounded(load_float(grad + j), clip_coef)), buf, mu, round);
    store_float(momentum + j, buf);
    update[j] = u;
    const float x = row_normalize ? u : bf16_round(u);
    sum_sq += static_cast<double>(x) * x;
  }
  sum_sq = warp_sum(sum_sq);
  if (!row_normalize) return sum_sq;
  const float norm = round(fmaxf(static_cast<float>(sqrt(sum_sq)), 1e-7f));
  double normalized_sum_sq = 0.0;
  for (int j = lane; j < cols; j += 32) {
    const float u = round(update[j] / norm);
    update[j] = u;
    const float x = bf16_round(u);
    normalized_sum_sq += static_cast<double>(x) * x;
  }
  return warp_sum(normalized_sum_sq);
}

__global__ void __launch_bounds__(kThreads)
    muon_momentum_rows(const float* __restrict__ grads, const __nv_bfloat16* __restrict__ grad_shard,
                       float* __restrict__ momentum_f32, __nv_bfloat16* __restrict__ momentum_bf16,
                       float* __restrict__ update, double* __restrict__ row_sum_sq,
                       const MuonRowSpan* __restrict__ spans, int span_count, int64_t total_rows,
                       const OptimizerStepScalars* __restrict__ scalars, const GradClipState* __restrict__ clip,
                       bool row_normalize) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= total_rows) return;
  const MuonRowSpan span = spans[find_entry(spans, span_count, row, &MuonRowSpan::row_begin)];
  const int64_t local = (row - span.row_begin) * span.cols;
  float* u = update + span.update_offset + local;
  const float mu = scalars->muon_momentum, clip_coef = clip->coefficient;
  double sum_sq;
  if (span.sharded)
    sum_sq = momentum_row(grad_shard + span.grad_offset + local, momentum_bf16 + span.momentum_offset + local, u,
                          span.cols, mu, clip_coef, row_normalize, RoundBf16{});
  else if (span.bank)
    sum_sq = momentum_row(grads + span.grad_offset + local, momentum_bf16 + span.momentum_offset + local, u,
                          span.cols, mu, clip_coef, row_normalize, RoundBf16{});
  else
    sum_sq = momentum_row(grads + span.grad_offset + local, momentum_f32 + span.momentum_offset + local, u,
                          span.cols, mu, clip_coef, row_normalize, optim::KeepF32{});
  if (threadIdx.x % 32 == 0) row_sum_sq[row] = sum_sq;
}

// denominator = bf16(bf16(‖X‖_F) + 1e-7) of each slot, from its rows' sums (fp64, fixed order).
__global__ void __launch_bounds__(kThreads)
    muon_frobenius(const double* __restrict__ row_sum_sq, const MuonSlot* __restrict__ slots,
                   float* __restrict__ denominators) {
  const MuonSlot slot = slots[blockIdx.x];
  double sum = 0.0;
  for (int r = threadIdx.x; r < slot.rows; r += kThreads) sum += row_sum_sq[slot.row_begin + r];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) {
    const float norm = bf16_round(static_cast<float>(sqrt(sum)));
    denominators[blockIdx.x] = bf16_round(norm + static_cast<float>(optim::kNsEps));
  }
}

struct TileOrigin {
  int slot_index;
  MuonSlot slot;
  int r0, c0;  // first row and column of the tile in the stored orientation
};

__device__ __forceinline__ TileOrigin tile_origin(const MuonSlot* slots, int slot_count, int64_t tile) {
  TileOrigin t;
  t.slot_index = find_entry(slots, slot_count, tile, &MuonSlot::tile_begin);
  t.slot = slots[t.slot_index];
  const int64_t local = tile - t.slot.tile_begin;
  const int tiles_per_row = (t.slot.cols + kTile - 1) / kTile;
  t.r0 = static_cast<int>(local / tiles_per_row) * kTile;
  t.c0 = static_cast<int>(local % tiles_per_row) * kTile;
  return t;
}

// Each block walks kTilesPerBlock consecutive tiles (mostly of one slot, whose table entry then
// stays in L1), so its setup is amortised over more than 1024 values.
template <typename TileOp>
__device__ __forceinline__ void for_each_tile(const MuonSlot* slots, int slot_count, int64_t total_tiles, TileOp op) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilesPerBlock;
  const int64_t last = first + kTilesPerBlock < total_tiles ? first + kTilesPerBlock : total_tiles;
  for (int64_t tile = first; tile < last; ++tile) {
    op(tile_origin(slots, slot_count, tile));
    __syncthreads();  // the next tile reuses the shared-memory tile
  }
}

// X = bf16(bf16(u) / denominator) in the slot's wide orientation (a tall slot is written transposed
// through shared memory, so both the reads and the writes are coalesced).
__global__ void __launch_bounds__(kTile* kTileRowsPerPass)
    muon_pack(const float* __restrict__ update, const MuonSlot* __restrict__ slots, int slot_count, int64_t total_tiles,
              const float* __restrict__ denominators) {
  __shared__ float tile[kTile][kTile + 1];
  for_each_tile(slots, slot_count, total_tiles, [&](const TileOrigin& t) {
    const MuonSlot& s = t.slot;
    const float denom = denominators[t.slot_index];
    const float* u = update + s.update_offset;
    const bool transposed = s.x_transposed;  // the same for the whole block
#pragma unroll 1  // unrolled, the IEEE division's slow-path call spills the other iterations' registers
    for (int i = threadIdx.y; i < kTile; i += kTileRowsPerPass) {
      const int r = t.r0 + i, c = t.c0 + threadIdx.x;
      if (r >= s.rows || c >= s.cols) continue;
      const float x = bf16_round(bf16_round(u[static_cast<int64_t>(r) * s.cols + c]) / denom);
      if (transposed)
        tile[i][threadIdx.x] = x;
      else
        s.x[static_cast<int64_t>(r) * s.x_ld + c] = __float2bfloat16_rn(x);
    }
    if (!transposed) return;
    __syncthreads();
    for (int i = threadIdx.y; i < kTile; i += kTileRowsPerPass) {
      const int c = t.c0 + i, r = t.r0 + threadIdx.x;  // X is [cols, rows]
      if (r < s.rows && c < s.cols)
        s.x[static_cast<int64_t>(c) * s.x_ld + r] = __float2bfloat16_rn(tile[threadIdx.x][i]);
    }
  });
}

// Calls op(r·cols + c, u) for every element (r, c) of the tile in the stored orientation, u read
// from the slot's x (a transposed x goes through shared memory, so reads and writes are coalesced).
template <typename Op>
__device__ __forceinline__ void for_each_stored_value(const TileOrigin& t, float (&tile)[kTile][kTile + 1], Op op) {
  const MuonSlot& s = t.slot;
  const bool transposed = s.x_transposed;  // the same for the whole block
  if (transposed) {
    for (int i = threadIdx.y; i < kTile; i += kTileRowsPerPass) {
      const int c = t.c0 + i, r = t.r0 + threadIdx.x;
      if (r < s.rows && c < s.cols) tile[i][threadIdx.x] = __bfloat162float(s.x[static_cast<int64_t>(c) * s.x_ld + r]);
    }
    __syncthreads();
  }
  for (int i = threadIdx.y; i < kTile; i += kTileRowsPerPass) {
    const int r = t.r0 + i, c = t.c0 + threadIdx.x;
    if (r >= s.rows || c >= s.cols) continue;
    const float u = transposed ? tile[threadIdx.x][i] : __bfloat162float(s.x[static_cast<int64_t>(r) * s.x_ld + c]);
    op(static_cast<int64_t>(r) * s.cols + c, u);
  }
}

// p ← decayed_step(p, u, 1 − lr·wd, alpha) with the orthogonalised u read back from x:
// matrices u = bf16(u · scale), alpha = −lr; banks alpha = −lr · scale (update_math.h, muon.cpp).
// (At least 6 blocks per SM: 42 registers, which the loop needs without spilling.)
__global__ void __launch_bounds__(kTile* kTileRowsPerPass, 6)
    muon_apply(float* __restrict__ params, const MuonSlot* __restrict__ slots, int slot_count, int64_t total_tiles,
               const OptimizerStepScalars* __restrict__ scalars) {
  __shared__ float tile[kTile][kTile + 1];
  const double lr = scalars->muon_lr;
  const float decay = scalars->muon_decay;
  for_each_tile(slots, slot_count, total_tiles, [&](const TileOrigin& t) {
    const MuonSlot& s = t.slot;
    const float alpha = static_cast<float>(s.bank ? -optim::mul_rounded(lr, s.shape_scale) : -lr);
    const float update_scale = static_cast<float>(s.shape_scale);
    float* p = params + s.param_offset;
    for_each_stored_value(t, tile, [&](int64_t idx, float u) {
      if (!s.bank) u = bf16_round(u * update_scale);
      p[idx] = optim::decayed_step(p[idx], u, decay, alpha);
    });
  });
}

// Parallel Muon: the orthogonalised owned bank slices, in their stored orientation, into the rank's
// block of the all-gather (at each slot's param_offset).
__global__ void __launch_bounds__(kTile* kTileRowsPerPass)
    muon_export(__nv_bfloat16* __restrict__ block, const MuonSlot* __restrict__ slots, int slot_count,
                int64_t total_tiles) {
  __shared__ float tile[kTile][kTile + 1];
  for_each_tile(slots, slot_count, total_tiles, [&](const TileOrigin& t) {
    __nv_bfloat16* out = block + t.slot.param_offset;
    for_each_stored_value(t, tile, [&](int64_t idx, float u) { out[idx] = __float2bfloat16_rn(u); });
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

GpuMuon::GpuMuon(const std::vector<MuonTensor>& tensors, int ns_steps, bool row_normalize,
                 const optim::ParallelMuonPlan* plan)
    : ns_steps_(ns_steps), row_normalize_(row_normalize), sharded_(plan != nullptr && plan->active()) {
  PG_CUDA_REQUIRE(ns_steps >= 0, "GpuMuon: muon_backend_steps must be >= 0");
  if (sharded_) {
    // Zeroed once: the padding of the blocks is never written.
    block_values_ = plan->block_values;
    const size_t block = static_cast<size_t>(block_values_), world = static_cast<size_t>(plan->world_size);
    grad_blocks_ = DeviceBuffer<__nv_bfloat16>(world * block, "Parallel Muon gradient blocks");
    grad_shard_ = DeviceBuffer<__nv_bfloat16>(block, "Parallel Muon gradient shard");
    update_block_ = DeviceBuffer<__nv_bfloat16>(block, "Parallel Muon update block");
    update_gather_ = DeviceBuffer<__nv_bfloat16>(world * block, "Parallel Muon gathered updates");
    for (auto* b : {&grad_blocks_, &grad_shard_, &update_block_, &update_gather_}) b->fill_bytes(0);
  }
  struct ShapeKey {  // the wide shape [n, m] and form of a set of slots
    int64_t n, m;
    NsForm form;
    int count;
  };
  std::vector<ShapeKey> keys;
  std::vector<size_t> slot_key;
  std::vector<MuonRowSpan> spans;
  std::vector<MuonSlot> batch_slots, export_slots, apply_slots;
  std::vector<size_t> exported;                 // batch slot of each export slot
  std::vector<int64_t> grad_base, momentum_base;  // of the sharded banks, for the plan's copies
  size_t banks_seen = 0;
  int64_t update_size = 0, momentum_f32_size = 0, momentum_bf16_size = 0;
  for (const MuonTensor& t : tensors) {
    PG_CUDA_REQUIRE(t.slices >= 1 && t.rows >= 1 && t.cols >= 1 && (t.bank || t.slices == 1),
                    "GpuMuon: a tensor needs positive sizes, and only banks have slices");
    PG_CUDA_REQUIRE(t.rows <= (1 << 30) && t.cols <= (1 << 30), "GpuMuon: a matrix dimension exceeds 2^30");
    const int64_t slice = t.rows * t.cols, numel = t.slices * slice;
    int64_t& momentum_size = t.bank ? momentum_bf16_size : momentum_f32_size;
    const optim::ParallelMuonPlan::Bank* sharded_bank = nullptr;
    if (sharded_ && t.bank) {
      PG_CUDA_REQUIRE(banks_seen < plan->banks.size(), "GpuMuon: more banks than the Parallel Muon plan holds");
      sharded_bank = &plan->banks[banks_seen++];
      PG_CUDA_REQUIRE(sharded_bank->param_offset == t.param_offset && sharded_bank->slices == t.slices &&
                          sharded_bank->rows == t.rows && sharded_bank->cols == t.cols,
                      "GpuMuon: a bank differs from the Parallel Muon plan's");
      grad_base.push_back(t.param_offset);
      momentum_base.push_back(momentum_size);
    }
    // The slices this rank orthogonalises: all of them, or a sharded bank's own (possibly none).
    const int64_t first = sharded_bank ? sharded_bank->shard.first : 0;
    const int64_t count = sharded_bank ? sharded_bank->shard.count : t.slices;
    if (count > 0)
      spans.push_back(MuonRowSpan{total_rows_, sharded_bank ? sharded_bank->block_offset : t.param_offset, update_size,
                                  momentum_size + first * slice, static_cast<int32_t>(t.cols), t.bank ? 1 : 0,
                                  sharded_bank ? 1 : 0});
    tensors_.push_back(TensorState{numel, momentum_size, t.bank});

    const int64_t n = std::min(t.rows, t.cols), m = std::max(t.rows, t.cols);
    const NsForm form = t.bank ? NsForm::kSquareThenScale : NsForm::kScaleThenSquare;
    const double shape_scale = std::sqrt(std::max(1.0, static_cast<double>(t.rows) / static_cast<double>(t.cols)));
    const int32_t rows = static_cast<int32_t>(t.rows), cols = static_cast<int32_t>(t.cols);
    const int32_t bank = t.bank ? 1 : 0;
    size_t k = 0;
    while (k < keys.size() && !(keys[k].n == n && keys[k].m == m && keys[k].form == form)) ++k;
    if (k == keys.size() && count > 0) keys.push_back(ShapeKey{n, m, form, 0});
    for (int64_t local = 0; local < count; ++local) {
      batch_slots.push_back(MuonSlot{0, total_rows_ + local * t.rows, update_size + local * slice,
                                     t.param_offset + (first + local) * slice, rows, cols, 0, t.rows > t.cols ? 1 : 0,
                                     bank, shape_scale, nullptr});
      slot_key.push_back(k);
      ++keys[k].count;
      if (!sharded_bank) continue;
      exported.push_back(batch_slots.size() - 1);
      export_slots.push_back(batch_slots.back());
      export_slots.back().param_offset = sharded_bank->block_offset + local * slice;  // in the rank's block
    }
    // A sharded bank's every slice is applied from the gathered updates (stored orientation).
    if (sharded_bank)
      for (int64_t s = 0; s < t.slices; ++s)
        apply_slots.push_back(MuonSlot{0, 0, 0, t.param_offset + s * slice, rows, cols, cols, 0, bank, shape_scale,
                                       update_gather_.data() + plan->packed_offset(banks_seen - 1, s)});
    total_rows_ += count * t.rows;
    update_size += count * slice;
    momentum_size += numel;
  }
  PG_CUDA_REQUIRE(!sharded_ || banks_seen == plan->banks.size(), "GpuMuon: fewer banks than the Parallel Muon plan");

  // A batch of a few matrices costs the latency of its launches (six per iteration) rather than its
  // work: its matrices join the smallest batch of the same form with at least kOwnBatch matrices whose
  // shape covers theirs, zero-padded. Zero rows and columns stay exactly zero through every op of the
  // iteration and add only zero terms to the other products, so the result is the unpadded one up to
  // the order of the fp32 sums (as between any two GEMM implementations).
  constexpr int kOwnBatch = 4;
  std::vector<size_t> batch_key(keys.size());
  for (size_t k = 0; k < keys.size(); ++k) {
    batch_key[k] = k;
    if (keys[k].count >= kOwnBatch) continue;
    for (size_t h = 0; h < keys.size(); ++h) {
      const ShapeKey& host = keys[h];
      if (host.count < kOwnBatch || host.form != keys[k].form || host.n < keys[k].n || host.m < keys[k].m) continue;
      const ShapeKey& best = keys[batch_key[k]];
      if (batch_key[k] == k || host.n * host.m < best.n * best.m) batch_key[k] = h;
    }
  }
  std::vector<int> batch_size(keys.size(), 0), group_of(keys.size(), -1);
  for (size_t k = 0; k < keys.size(); ++k) batch_size[batch_key[k]] += keys[k].count;
  for (size_t k = 0; k < keys.size(); ++k) {
    if (batch_key[k] != k) continue;
    group_of[k] = static_cast<int>(groups_.size());
    groups_.push_back(std::make_unique<BatchedNewtonSchulz>(batch_size[k], static_cast<int>(keys[k].n),
                                                            static_cast<int>(keys[k].m), keys[k].form));
  }
  std::vector<int> filled(groups_.size(), 0);
  for (size_t i = 0; i < batch_slots.size(); ++i) {
    const int g = group_of[batch_key[slot_key[i]]];
    const int64_t index = filled[g]++;
    batch_slots[i].x = groups_[g]->x() + index * groups_[g]->n() * groups_[g]->m();
    batch_slots[i].x_ld = groups_[g]->m();
  }
  for (size_t j = 0; j < export_slots.size(); ++j) {
    export_slots[j].x = batch_slots[exported[j]].x;
    export_slots[j].x_ld = batch_slots[exported[j]].x_ld;
  }
  // Everything else is applied from its batch.
  for (const MuonSlot& slot : batch_slots)
    if (!(sharded_ && slot.bank)) apply_slots.push_back(slot);
  if (tensors.empty()) return;

  auto number_tiles = [](std::vector<MuonSlot>& slots) {
    int64_t tiles = 0;
    for (MuonSlot& slot : slots) {
      slot.tile_begin = tiles;
      tiles += ceil_div(slot.rows, kTile) * ceil_div(slot.cols, kTile);
    }
    return tiles;
  };
  batch_tiles_ = number_tiles(batch_slots);
  export_tiles_ = number_tiles(export_slots);
  apply_tiles_ = number_tiles(apply_slots);
  if (!spans.empty()) spans_ = DeviceBuffer<MuonRowSpan>(spans, "Muon row table");
  if (!batch_slots.empty()) batch_slots_ = DeviceBuffer<MuonSlot>(batch_slots, "Muon batch slot table");
  if (!export_slots.empty()) export_slots_ = DeviceBuffer<MuonSlot>(export_slots, "Muon export slot table");
  if (!apply_slots.empty()) apply_slots_ = DeviceBuffer<MuonSlot>(apply_slots, "Muon apply slot table");
  if (sharded_) {
    grads_to_blocks_ = SegmentCopy(plan->banks_to_blocks(grad_base), "Parallel Muon gradient packing");
    momenta_to_block_ = SegmentCopy(plan->owned_to_block(momentum_base), "Parallel Muon momentum packing");
    gathered_to_momenta_ =
        SegmentCopy(optim::reversed(plan->banks_to_blocks(momentum_base)), "Parallel Muon momentum unpacking");
  }
  if (momentum_f32_size > 0) {
    momentum_f32_ = DeviceBuffer<float>(static_cast<size_t>(momentum_f32_size), "Muon momentum (fp32)");
    momentum_f32_.fill_bytes(0);
  }
  if (momentum_bf16_size > 0) {
    momentum_bf16_ = DeviceBuffer<__nv_bfloat16>(static_cast<size_t>(momentum_bf16_size), "Muon momentum (bf16)");
    momentum_bf16_.fill_bytes(0);
  }
  if (update_size > 0) {
    update_ = DeviceBuffer<float>(static_cast<size_t>(update_size), "Muon update");
    row_sumsq_ = DeviceBuffer<double>(static_cast<size_t>(total_rows_), "Muon row sums of squares");
    denominators_ = DeviceBuffer<float>(batch_slots.size(), "Muon Frobenius denominators");
  }
  // One iteration on the zeroed batches builds every GEMM plan now, outside any graph capture.
  if (ns_steps_ > 0)
    for (auto& g : groups_) g->run(gemm_, 1, nullptr);
  PG_CUDA_CHECK(cudaDeviceSynchronize());
}

void GpuMuon::enqueue(float* params, const float* grads, const OptimizerStepScalars* scalars, const GradClipState* clip,
                      cudaStream_t stream) {
  PG_CUDA_REQUIRE(!sharded_, "GpuMuon::enqueue: Parallel Muon runs its phases around the caller's collectives");
  enqueue_prepare(grads, scalars, clip, stream);
  enqueue_newton_schulz(stream);
  enqueue_apply(params, scalars, stream);
}

void GpuMuon::enqueue_prepare(const float* grads, const OptimizerStepScalars* scalars, const GradClipState* clip,
                              cudaStream_t stream) {
  if (total_rows_ == 0) return;  // no Muon tensor, or a rank that owns no slice of any bank
  muon_momentum_rows<<<static_cast<unsigned>(ceil_div(total_rows_, kRowsPerBlock)), kThreads, 0, stream>>>(
      grads, grad_shard_.data(), momentum_f32_.data(), momentum_bf16_.data(), update_.data(), row_sumsq_.data(),
      spans_.data(), static_cast<int>(spans_.size()), total_rows_, scalars, clip, row_normalize_);
  PG_CUDA_LAUNCH_CHECK();
  muon_frobenius<<<static_cast<unsigned>(batch_slots_.size()), kThreads, 0, stream>>>(
      row_sumsq_.data(), batch_slots_.data(), denominators_.data());
  PG_CUDA_LAUNCH_CHECK();
  muon_pack<<<static_cast<unsigned>(ceil_div(batch_tiles_, kTilesPerBlock)), dim3(kTile, kTileRowsPerPass), 0,
              stream>>>(update_.data(), batch_slots_.data(), static_cast<int>(batch_slots_.size()), batch_tiles_,
                        denominators_.data());
  PG_CUDA_LAUNCH_CHECK();
}

void GpuMuon::enqueue_newton_schulz(cudaStream_t stream) {
  for (auto& g : groups_) g->run(gemm_, ns_steps_, stream);
}

void GpuMuon::enqueue_apply(float* params, const OptimizerStepScalars* scalars, cudaStream_t stream) {
  if (apply_tiles_ == 0) return;
  muon_apply<<<static_cast<unsigned>(ceil_div(apply_tiles_, kTilesPerBlock)), dim3(kTile, kTileRowsPerPass), 0,
               stream>>>(params, apply_slots_.data(), static_cast<int>(apply_slots_.size()), apply_tiles_, scalars);
  PG_CUDA_LAUNCH_CHECK();
}

void GpuMuon::enqueue_pack_bank_grads(const float* grads, cudaStream_t stream) {
  PG_CUDA_REQUIRE(sharded_, "GpuMuon: the bank gradients are packed under Parallel Muon only");
  grads_to_blocks_.enqueue(grads, grad_blocks_.data(), stream);
}

void GpuMuon::enqueue_export_updates(cudaStream_t stream) {
  PG_CUDA_REQUIRE(sharded_, "GpuMuon: updates are exported under Parallel Muon only");
  if (export_tiles_ == 0) return;  // this rank owns no slice
  muon_export<<<static_cast<unsigned>(ceil_div(export_tiles_, kTilesPerBlock)), dim3(kTile, kTileRowsPerPass), 0,
                stream>>>(update_block_.data(), export_slots_.data(), static_cast<int>(export_slots_.size()),
                          export_tiles_);
  PG_CUDA_LAUNCH_CHECK();
}

void GpuMuon::enqueue_pack_owned_momenta(cudaStream_t stream) {
  PG_CUDA_REQUIRE(sharded_, "GpuMuon: momenta are gathered under Parallel Muon only");
  momenta_to_block_.enqueue(momentum_bf16_.data(), update_block_.data(), stream);
}

void GpuMuon::enqueue_unpack_gathered_momenta(cudaStream_t stream) {
  PG_CUDA_REQUIRE(sharded_, "GpuMuon: momenta are gathered under Parallel Muon only");
  gathered_to_momenta_.enqueue(update_gather_.data(), momentum_bf16_.data(), stream);
}

std::vector<float> GpuMuon::momentum(size_t k) const {
  PG_CUDA_REQUIRE(k < tensors_.size(), "GpuMuon::momentum: no such tensor");
  const TensorState& t = tensors_[k];
  std::vector<float> out(static_cast<size_t>(t.numel));
  if (t.bank) {
    std::vector<__nv_bfloat16> bits(out.size());
    PG_CUDA_CHECK(cudaMemcpy(bits.data(), momentum_bf16_.data() + t.momentum_offset,
                             bits.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < out.size(); ++i) out[i] = __bfloat162float(bits[i]);
  } else {
    PG_CUDA_CHECK(cudaMemcpy(out.data(), momentum_f32_.data() + t.momentum_offset, out.size() * sizeof(float),
                             cudaMemcpyDeviceToHost));
  }
  return out;
}

void GpuMuon::set_momentum(size_t k, const std::vector<float>& values) {
  PG_CUDA_REQUIRE(k < tensors_.size(), "GpuMuon::set_momentum: no such tensor");
  const TensorState& t = tensors_[k];
  PG_CUDA_REQUIRE(static_cast<int64_t>(values.size()) == t.numel, "GpuMuon::set_momentum: wrong number of values");
  if (t.bank) {
    std::vector<__nv_bfloat16> bits(values.size());
    for (size_t i = 0; i < values.size(); ++i) bits[i] = __float2bfloat16_rn(values[i]);
    PG_CUDA_CHECK(cudaMemcpy(momentum_bf16_.data() + t.momentum_offset, bits.data(),
                             bits.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  } else {
    PG_CUDA_CHECK(cudaMemcpy(momentum_f32_.data() + t.momentum_offset, values.data(), values.size() * sizeof(float),
                             cudaMemcpyHostToDevice));
  }
}

}  // namespace pgolf::cuda
