// ParallelMuonPlan (optim/parallel_muon_plan.h): slice ownership, the packed rank blocks of the
// reduce-scatter and all-gather, and the replicated runs. The collectives are simulated on host
// arrays: what the packing plans move must be exactly the slices each rank owns.
#include <gtest/gtest.h>

#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "model/tiny_models.h"
#include "optim/parallel_muon_plan.h"

using namespace pgolf;
using namespace pgolf::optim;

namespace {

constexpr double kUnwritten = -1.0;  // every value moved below is positive

void apply(const std::vector<CopyRun>& runs, const std::vector<double>& from, std::vector<double>& to) {
  for (const CopyRun& r : runs)
    for (int64_t i = 0; i < r.count; ++i) to.at(static_cast<size_t>(r.to + i)) = from.at(static_cast<size_t>(r.from + i));
}

size_t written(const std::vector<double>& v) {
  size_t n = 0;
  for (double x : v) n += x != kUnwritten;
  return n;
}

// A scalar, a bank of 10 slices of [2, 3], a 2-D matrix, a bank of 5 slices of [3, 2], an embedding.
ParamLayout small_layout() {
  return ParamLayout({{"a", {3}, ParamGroup::Scalar, InitKind::Zeros},
                      {"bank_a", {10, 2, 3}, ParamGroup::Matrix, InitKind::Zeros},
                      {"w", {4, 4}, ParamGroup::Matrix, InitKind::Zeros},
                      {"bank_b", {5, 3, 2}, ParamGroup::Matrix, InitKind::Zeros},
                      {"emb", {7, 2}, ParamGroup::Embed, InitKind::Zeros}});
}

ParamLayout tiny_s1560_layout() { return ParamLayout(param_specs(ModelConfig::from_config(test::tiny_preset("s1560")))); }

}  // namespace

TEST(SliceShard, ZeroPaddedOwnership) {
  // 10 slices over 4 ranks: P = 3, the last rank owns slice 9 only; 5 over 4: P = 2, rank 3 owns none.
  const SliceShard a = SliceShard::of(10, 3, 4), b = SliceShard::of(5, 3, 4), c = SliceShard::of(5, 2, 4);
  EXPECT_EQ(a.per_rank, 3);
  EXPECT_EQ(a.first, 9);
  EXPECT_EQ(a.count, 1);
  EXPECT_EQ(b.per_rank, 2);
  EXPECT_EQ(b.first, 6);
  EXPECT_EQ(b.count, 0);
  EXPECT_EQ(c.first, 4);
  EXPECT_EQ(c.count, 1);
  EXPECT_THROW(SliceShard::of(5, 4, 4), Error);
}

TEST(ParallelMuonPlan, BanksBlocksAndReplicatedRunsOfASmallLayout) {
  const ParamLayout layout = small_layout();
  const ParallelMuonPlan p = ParallelMuonPlan::of(layout, 3, 4);
  EXPECT_TRUE(p.active());
  ASSERT_EQ(p.banks.size(), 2u);
  EXPECT_EQ(p.banks[0].index, 1u);
  EXPECT_EQ(p.banks[0].param_offset, layout.offset(1));
  EXPECT_EQ(p.banks[0].slice_values, 6);
  EXPECT_EQ(p.banks[0].block_offset, 0);
  EXPECT_EQ(p.banks[1].index, 3u);
  EXPECT_EQ(p.banks[1].block_offset, 3 * 6);  // after bank_a's P = 3 slices
  EXPECT_EQ(p.block_values, 3 * 6 + 2 * 6);
  // Slice s of a bank lives in block s / P, at the bank's offset, (s mod P) slices in.
  EXPECT_EQ(p.packed_offset(0, 9), 3 * 30);
  EXPECT_EQ(p.packed_offset(0, 4), 1 * 30 + 1 * 6);
  EXPECT_EQ(p.packed_offset(1, 1), 18 + 6);
  EXPECT_EQ(p.packed_offset(1, 4), 2 * 30 + 18);
  EXPECT_THROW(p.packed_offset(1, 5), Error);
  // Rank 3 owns bank_a's slice 9 and nothing of bank_b.
  const std::vector<int64_t> base = {100, 1000};
  EXPECT_EQ(p.owned_to_block(base), (std::vector<CopyRun>{{100 + 9 * 6, 0, 6}}));
  // bank_a: ranks 0..3 own 3, 3, 3, 1 slices; bank_b: 2, 2, 1, 0.
  EXPECT_EQ(p.banks_to_blocks(base), (std::vector<CopyRun>{{100, 0, 18},
                                                           {100 + 18, 30, 18},
                                                           {100 + 36, 60, 18},
                                                           {100 + 54, 90, 6},
                                                           {1000, 18, 12},
                                                           {1000 + 12, 48, 12},
                                                           {1000 + 24, 78, 6}}));
  // Replicated: a, w (a 2-D Muon matrix: averaged as a whole), emb; padding between tensors skipped.
  EXPECT_EQ(p.replicated, (std::vector<CopyRun>{{layout.offset(0), 0, 3}, {layout.offset(2), 3, 16},
                                                {layout.offset(4), 19, 14}}));
  EXPECT_EQ(p.replicated_values, 33);
  EXPECT_EQ(reversed(p.replicated)[1], (CopyRun{3, layout.offset(2), 16}));
}

// On the banked tiny stack and world sizes that need padding: the reduce-scatter's input (every
// bank slice in its rank's block) holds each slice once, where packed_offset says; the blocks of
// every rank's owned slices, concatenated (an all-gather), are that same buffer; and the reverse
// copies put every bank value back. Every value is either replicated or in a bank.
TEST(ParallelMuonPlan, PackedBlocksAreTheRanksOwnedSlices) {
  const ParamLayout layout = tiny_s1560_layout();
  std::vector<double> params(static_cast<size_t>(layout.total()));
  for (size_t i = 0; i < params.size(); ++i) params[i] = static_cast<double>(i + 1);
  for (int world : {1, 2, 3, 4, 5}) {
    SCOPED_TRACE(world);
    const ParallelMuonPlan p = ParallelMuonPlan::of(layout, 0, world);
    ASSERT_EQ(p.banks.size(), 4u);  // qo, kv, mlp_up, mlp_down
    EXPECT_EQ(p.active(), world > 1);
    std::vector<int64_t> base;
    int64_t bank_values = 0;
    for (const auto& b : p.banks) {
      base.push_back(b.param_offset);
      bank_values += b.slices * b.slice_values;
    }
    EXPECT_EQ(p.replicated_values + bank_values, layout.count());

    const size_t packed_size = static_cast<size_t>(p.block_values * world);
    std::vector<double> packed(packed_size, kUnwritten);
    apply(p.banks_to_blocks(base), params, packed);
    EXPECT_EQ(written(packed), static_cast<size_t>(bank_values));
    for (size_t b = 0; b < p.banks.size(); ++b)
      for (int64_t s = 0; s < p.banks[b].slices; ++s)
        for (int64_t j : {int64_t{0}, p.banks[b].slice_values - 1})  // first and last value
          ASSERT_EQ(packed[static_cast<size_t>(p.packed_offset(b, s) + j)],
                    params[static_cast<size_t>(p.banks[b].param_offset + s * p.banks[b].slice_values + j)])
              << "bank " << b << " slice " << s;

    std::vector<double> gathered;
    for (int r = 0; r < world; ++r) {
      const ParallelMuonPlan pr = ParallelMuonPlan::of(layout, r, world);
      ASSERT_EQ(pr.block_values, p.block_values);
      for (size_t b = 0; b < p.banks.size(); ++b) EXPECT_EQ(pr.banks[b].block_offset, p.banks[b].block_offset);
      std::vector<double> block(static_cast<size_t>(pr.block_values), kUnwritten);
      apply(pr.owned_to_block(base), params, block);
      gathered.insert(gathered.end(), block.begin(), block.end());
    }
    EXPECT_EQ(gathered, packed);

    std::vector<double> compact(static_cast<size_t>(p.replicated_values), kUnwritten);
    apply(p.replicated, params, compact);
    EXPECT_EQ(written(compact), compact.size());
    std::vector<double> restored(params.size(), kUnwritten);
    apply(reversed(p.banks_to_blocks(base)), packed, restored);
    apply(reversed(p.replicated), compact, restored);
    EXPECT_EQ(written(restored), static_cast<size_t>(layout.count()));
    for (size_t i = 0; i < restored.size(); ++i)
      if (restored[i] != kUnwritten) ASSERT_EQ(restored[i], params[i]) << i;
  }
}

TEST(ParallelMuonPlan, PerMatrixStacksHaveNoBanks) {
  const ParamLayout layout(param_specs(ModelConfig::from_config(test::tiny_preset("s691"))));
  const ParallelMuonPlan p = ParallelMuonPlan::of(layout, 1, 2);
  EXPECT_TRUE(p.banks.empty());
  EXPECT_FALSE(p.active());
  EXPECT_EQ(p.block_values, 0);
  EXPECT_EQ(p.replicated_values, layout.count());
  // Runs in layout order, consecutive in the packed buffer, each tensor in one run.
  int64_t to = 0;
  for (const CopyRun& r : p.replicated) {
    EXPECT_EQ(r.to, to);
    to += r.count;
  }
  for (size_t i = 0; i < layout.size(); ++i) {
    bool inside = false;
    for (const CopyRun& r : p.replicated)
      inside = inside || (layout.offset(i) >= r.from && layout.offset(i) + layout.numel(i) <= r.from + r.count);
    EXPECT_TRUE(inside) << layout.spec(i).name;
  }
}
