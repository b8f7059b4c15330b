// Per-document LoRA adapters for test-time training (SPEC §6.5): every batch row (one document) has
// its own rank-r pair A [r, in], B [out, r] per target and per virtual layer (one slot per entry of
// the layer plan), plus one LM-head pair. Attachment points (#1530/S1560):
//   q, k, v += LoRA(n)        n = the normed attention input RMSNorm(x_in)·s
//   attn_out += LoRA_o(n)     (reads n, not the attention output)
//   mlp_out += LoRA_mlp(m)    m = the normed MLP input (a parallel d → d adapter)
//   logits_raw += LoRA_head(h_final) before the soft cap.
// Parameters and gradients live in two flat arrays of one layout, so an optimizer walks them together.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "core/rng.h"
#include "model/config.h"
#include "model/lora_segment.h"

namespace pgolf {

enum class LoraTarget { Q, K, V, O, Mlp, Head };
inline constexpr int kNumLoraTargets = 6;
// The targets that read the normed attention input n: those present form a virtual layer's group.
inline constexpr std::array<LoraTarget, 4> kLoraGroupTargets = {LoraTarget::Q, LoraTarget::K, LoraTarget::V,
                                                                LoraTarget::O};

struct LoraConfig {
  int rank = 8;
  // Which targets carry adapters (indexed by LoraTarget).
  std::array<bool, kNumLoraTargets> targets = {true, false, true, false, false, true};
  bool on(LoraTarget t) const { return targets[static_cast<size_t>(t)]; }
};

// Where one adapter (one target at one virtual layer) lives in the flat parameter array. The q, k, v
// and o adapters of a virtual layer read the same input n: their A matrices form one group, stored
// row by row ([rows, group_size, rank, in]), so that x·Aᵀ and dh·A run as one product over the group.
struct LoraAdapterLayout {
  int64_t in = 0, out = 0;
  int64_t a_offset = -1;  // row 0's A [rank, in]; row b's starts at a_offset + b·a_stride
  int64_t a_stride = 0;   // values from one row's A to the next: group_size·rank·in
  int64_t b_offset = -1;  // B [rows, out, rank]
  int group_index = 0;    // place in the group (q, k, v, o order of those present)
  int group_size = 1;     // adapters in the group (1: an ungrouped mlp or head adapter)
};

// The flat layout of all adapters for `rows` documents and `slots` virtual layers; returns the total
// number of values. `adapters` is indexed [target][slot] (the head at slot 0 only; absent targets
// keep offsets -1). Storage, slot by slot: the q/k/v/o group's A block, those adapters' B, the mlp
// adapter's A and B; the head's A and B last. LoraAdapters and the CUDA backend's GpuLora share it.
int64_t lora_layout(const ModelConfig& model, const LoraConfig& config, int64_t rows, int slots,
                    std::vector<LoraAdapterLayout>& adapters);

// Every present A block (one per group) and B as row segments: what a step over a batch of fewer rows
// than the adapters touches (the engines step only the batch's rows; the others keep their values and moments).
std::vector<LoraRowSegment> lora_row_segments(std::span<const LoraAdapterLayout> adapters, int rank);

// BatchedLinearLoRA.reset over a lora_layout: A ~ U(±1/sqrt(in)) drawn adapter by adapter in [target][slot]
// order (each A's rows·rank·in values row by row, wherever the group puts them), B = 0.
// LoraAdapters::reset draws these values; the CUDA engine makes the same bits on the device (GpuLora::draw).
template <typename T>
void draw_lora_params(std::span<const LoraAdapterLayout> adapters, int64_t rows, int rank, Rng& rng,
                      std::span<T> params);

template <typename T>
class LoraAdapters {
 public:
  using Adapter = LoraAdapterLayout;

  // `rows` = batch rows (documents), `slots` = virtual layers of the plan the model runs.
  LoraAdapters(const ModelConfig& model, const LoraConfig& config, int64_t rows, int slots);

  const LoraConfig& config() const { return config_; }
  int64_t rows() const { return rows_; }
  int slots() const { return slots_; }
  int64_t rank() const { return config_.rank; }
  // The adapter of `target` at virtual layer `slot` (slot ignored for the head), or null if absent.
  const Adapter* find(LoraTarget target, int slot) const;

  std::span<T> params() { return params_; }
  std::span<const T> params() const { return params_; }
  std::span<T> grads() { return grads_; }
  std::span<const T> grads() const { return grads_; }
  void zero_grad();
  std::span<const Adapter> layout() const { return adapters_; }
  // BatchedLinearLoRA.reset: A ~ U(±1/sqrt(in)), B = 0, for every adapter and row.
  void reset(Rng& rng);

 private:
  LoraConfig config_;
  int64_t rows_ = 0;
  int slots_ = 0;
  std::vector<Adapter> adapters_;  // [target][slot], head at slot 0 only
  std::vector<T> params_, grads_;
};

}  // namespace pgolf
