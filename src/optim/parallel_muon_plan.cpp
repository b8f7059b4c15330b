#include "optim/parallel_muon_plan.h"

#include <algorithm>

#include "core/error.h"
#include "model/params.h"

namespace pgolf::optim {

SliceShard SliceShard::of(int64_t slices, int rank, int world_size) {
  PG_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "slice shard: rank {} outside world size {}", rank,
           world_size);
  SliceShard s;
  s.per_rank = (slices + world_size - 1) / world_size;
  s.first = rank * s.per_rank;
  s.count = std::clamp<int64_t>(slices - s.first, 0, s.per_rank);
  return s;
}

std::vector<CopyRun> reversed(const std::vector<CopyRun>& runs) {
  std::vector<CopyRun> out;
  out.reserve(runs.size());
  for (const CopyRun& r : runs) out.push_back(CopyRun{r.to, r.from, r.count});
  return out;
}

ParallelMuonPlan ParallelMuonPlan::of(const ParamLayout& layout, int rank, int world_size) {
  ParallelMuonPlan p;
  p.rank = rank;
  p.world_size = world_size;
  for (size_t i = 0; i < layout.size(); ++i) {
    const ParamSpec& s = layout.spec(i);
    if (s.group == ParamGroup::Matrix && s.shape.size() == 3) {
      Bank b;
      b.index = i;
      b.param_offset = layout.offset(i);
      b.slices = s.shape[0], b.rows = s.shape[1], b.cols = s.shape[2];
      b.slice_values = b.rows * b.cols;
      b.shard = SliceShard::of(b.slices, rank, world_size);
      b.block_offset = p.block_values;
      p.block_values += b.shard.per_rank * b.slice_values;
      p.banks.push_back(b);
      continue;
    }
    CopyRun* last = p.replicated.empty() ? nullptr : &p.replicated.back();
    if (last && last->from + last->count == layout.offset(i))
      last->count += s.numel();
    else
      p.replicated.push_back(CopyRun{layout.offset(i), p.replicated_values, s.numel()});
    p.replicated_values += s.numel();
  }
  return p;
}

int64_t ParallelMuonPlan::packed_offset(size_t b, int64_t s) const {
  const Bank& bank = banks.at(b);
  PG_CHECK(s >= 0 && s < bank.slices, "Parallel Muon: slice {} of a bank of {}", s, bank.slices);
  const int64_t owner = s / bank.shard.per_rank;
  return owner * block_values + bank.block_offset + (s - owner * bank.shard.per_rank) * bank.slice_values;
}

std::vector<CopyRun> ParallelMuonPlan::banks_to_blocks(const std::vector<int64_t>& bank_base) const {
  PG_CHECK(bank_base.size() == banks.size(), "Parallel Muon: {} bank offsets for {} banks", bank_base.size(),
           banks.size());
  std::vector<CopyRun> runs;
  for (size_t b = 0; b < banks.size(); ++b) {
    for (int r = 0; r < world_size; ++r) {
      // Rank r's slices of the bank are consecutive both in the bank and in block r.
      const SliceShard shard = SliceShard::of(banks[b].slices, r, world_size);
      if (shard.count == 0) continue;
      runs.push_back(CopyRun{bank_base[b] + shard.first * banks[b].slice_values, packed_offset(b, shard.first),
                             shard.count * banks[b].slice_values});
    }
  }
  return runs;
}

std::vector<CopyRun> ParallelMuonPlan::owned_to_block(const std::vector<int64_t>& bank_base) const {
  PG_CHECK(bank_base.size() == banks.size(), "Parallel Muon: {} bank offsets for {} banks", bank_base.size(),
           banks.size());
  std::vector<CopyRun> runs;
  for (size_t b = 0; b < banks.size(); ++b) {
    const Bank& bank = banks[b];
    if (bank.shard.count == 0) continue;
    runs.push_back(CopyRun{bank_base[b] + bank.shard.first * bank.slice_values, bank.block_offset,
                           bank.shard.count * bank.slice_values});
  }
  return runs;
}

}  // namespace pgolf::optim
