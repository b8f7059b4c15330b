// Where the values of Parallel Muon travel between ranks (SPEC §4.2, §4.10; optim/muon.h): which
// slices of each bank a rank owns, how the banks are packed into the one reduce-scatter of their
// gradients and the one all-gather of their updates, and which values are "replicated" (everything
// that is not a bank: all-reduced in one packed buffer). Host logic only, shared by both engines.
//
// The packed collectives hold world_size blocks of block_values each. Block r holds, bank after
// bank, the P_b slices [r·P_b, (r+1)·P_b) of every bank b (P_b = SliceShard::per_rank), zero-padded
// where r·P_b + P_b runs past the bank's slices. A reduce-scatter hands rank r block r (its owned
// slices of every bank), an all-gather of every rank's block rebuilds the whole packed buffer.
//
// This header is free of fmt, so CUDA sources may include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pgolf {
class ParamLayout;
}

namespace pgolf::optim {

// The slices of a bank that one rank owns under Parallel Muon.
struct SliceShard {
  int64_t per_rank = 0;  // P: padded slices / world size
  int64_t first = 0;     // rank · P
  int64_t count = 0;     // owned real slices: min(P, slices − first), possibly 0
  static SliceShard of(int64_t slices, int rank, int world_size);
};

// `count` consecutive values from source[from] to destination[to].
struct CopyRun {
  int64_t from = 0, to = 0, count = 0;
  bool operator==(const CopyRun&) const = default;
};

// The same copies in the other direction (destination back to source).
std::vector<CopyRun> reversed(const std::vector<CopyRun>& runs);

struct ParallelMuonPlan {
  struct Bank {
    size_t index = 0;         // in the ParamLayout
    int64_t param_offset = 0;  // in the parameter / gradient arrays
    int64_t slices = 0, rows = 0, cols = 0;
    int64_t slice_values = 0;  // rows · cols
    SliceShard shard;          // this rank's slices
    int64_t block_offset = 0;  // where the bank's P slices start in every rank's block
  };

  int rank = 0, world_size = 1;
  std::vector<Bank> banks;  // the 3-D parameters of the Matrix group, in layout order
  int64_t block_values = 0;  // values per rank in the packed collectives: Σ P_b · slice_values_b
  // Every parameter that is not a bank (layout offset → offset in the packed all-reduce buffer),
  // adjacent tensors merged into one run; replicated_values values in all.
  std::vector<CopyRun> replicated;
  int64_t replicated_values = 0;

  static ParallelMuonPlan of(const ParamLayout& layout, int rank, int world_size);

  // Parallel Muon runs when there are banks and several ranks; otherwise every gradient is averaged.
  bool active() const { return world_size > 1 && !banks.empty(); }

  // Offset of slice s of bank b in the packed buffer of world_size blocks.
  int64_t packed_offset(size_t b, int64_t s) const;
  // Every slice of every bank from an array holding bank b at bank_base[b] (slices contiguous) to
  // its place in the world_size blocks: the reduce-scatter's input. Reversed: the all-gather's
  // output back to the banks.
  std::vector<CopyRun> banks_to_blocks(const std::vector<int64_t>& bank_base) const;
  // This rank's slices of every bank from such an array to its own block (at 0): the all-gather's input.
  std::vector<CopyRun> owned_to_block(const std::vector<int64_t>& bank_base) const;
};

}  // namespace pgolf::optim
