// split_batch (model/batch.h): the pieces forward-only work is cut into when a batch is larger than
// an engine's max_tokens, and that the model's losses over the pieces are those of the whole batch.
#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "model/batch.h"
#include "model/cpu_model.h"
#include "tiny_models.h"

namespace pgolf {
namespace {

Batch one_row(const std::vector<int32_t>& cu, int vocab, uint64_t seed = 3) {
  Batch b;
  b.rows = 1;
  b.seq_len = cu.back();
  Rng rng(seed);
  for (int64_t i = 0; i < b.seq_len; ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  b.cu_seqlens = cu;
  return b;
}

// The non-empty segments [start, end) of a batch, in absolute token offsets.
std::vector<std::pair<int32_t, int32_t>> segments_of(const std::vector<Batch>& pieces) {
  std::vector<std::pair<int32_t, int32_t>> out;
  int32_t at = 0;
  for (const Batch& p : pieces) {
    const std::vector<int32_t> cu = p.segments();
    for (size_t s = 0; s + 1 < cu.size(); ++s)
      if (cu[s + 1] > cu[s]) out.emplace_back(at + cu[s], at + cu[s + 1]);
    at += static_cast<int32_t>(p.tokens());
  }
  return out;
}

TEST(SplitBatch, ABatchThatFitsIsKept) {
  const Batch b = test::tiny_batch(64, true);
  const std::vector<Batch> pieces = split_batch(b, b.tokens());
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].inputs, b.inputs);
  EXPECT_EQ(pieces[0].cu_seqlens, b.cu_seqlens);
}

TEST(SplitBatch, DenseRowsGoInRunsOfWholeRows) {
  Batch b;
  b.rows = 5;
  b.seq_len = 4;
  for (int i = 0; i < 20; ++i) b.inputs.push_back(i), b.targets.push_back(i + 1);
  const std::vector<Batch> pieces = split_batch(b, 9);  // two rows per piece: 2 + 2 + 1
  ASSERT_EQ(pieces.size(), 3u);
  std::vector<int32_t> inputs, targets;
  for (const Batch& p : pieces) {
    EXPECT_EQ(p.seq_len, 4);
    EXPECT_LE(p.tokens(), 9);
    EXPECT_TRUE(p.cu_seqlens.empty());
    inputs.insert(inputs.end(), p.inputs.begin(), p.inputs.end());
    targets.insert(targets.end(), p.targets.begin(), p.targets.end());
  }
  EXPECT_EQ(pieces[2].rows, 1);
  EXPECT_EQ(inputs, b.inputs);
  EXPECT_EQ(targets, b.targets);
}

// losses_from follows its rows into runs of whole rows; a row cut into pieces drops it (every loss
// is then computed); validate checks its size and range.
TEST(SplitBatch, LossesFromFollowsWholeRows) {
  Batch b;
  b.rows = 5;
  b.seq_len = 4;
  for (int i = 0; i < 20; ++i) b.inputs.push_back(i), b.targets.push_back(i + 1);
  b.losses_from = {0, 3, 4, 1, 2};
  const std::vector<Batch> pieces = split_batch(b, 9);
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[0].losses_from, (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(pieces[1].losses_from, (std::vector<int32_t>{4, 1}));
  EXPECT_EQ(pieces[2].losses_from, (std::vector<int32_t>{2}));
  for (const Batch& p : pieces) EXPECT_NO_THROW(p.validate(64));

  Batch row = one_row({0, 7, 15, 20, 33, 40, 40, 40}, 64);
  row.losses_from = {20};
  for (const Batch& p : split_batch(row, 16)) EXPECT_TRUE(p.losses_from.empty());

  Batch bad = b;
  bad.losses_from = {0, 1};
  EXPECT_THROW(bad.validate(64), std::runtime_error) << "one entry per row";
  bad.losses_from = {0, 1, 5, 0, 0};
  EXPECT_THROW(bad.validate(64), std::runtime_error) << "at most seq_len";
  bad.losses_from = {0, -1, 0, 0, 0};
  EXPECT_THROW(bad.validate(64), std::runtime_error) << "not negative";
}

TEST(SplitBatch, ALongRowIsCutAtSegmentEnds) {
  // Segments 7, 8, 5, 13, 7 (and padding); at most 16 tokens a piece: [7+8] [5] [13] [7].
  const Batch b = one_row({0, 7, 15, 20, 33, 40, 40, 40}, 64);
  const std::vector<Batch> pieces = split_batch(b, 16);
  ASSERT_EQ(pieces.size(), 4u);
  std::vector<int32_t> inputs, targets;
  for (const Batch& p : pieces) {
    EXPECT_EQ(p.rows, 1);
    EXPECT_LE(p.tokens(), 16);
    EXPECT_EQ(p.cu_seqlens.size() % 64, 0u) << "padded like document packing";
    EXPECT_EQ(p.cu_seqlens.back(), p.seq_len);
    EXPECT_NO_THROW(p.validate(64));
    inputs.insert(inputs.end(), p.inputs.begin(), p.inputs.end());
    targets.insert(targets.end(), p.targets.begin(), p.targets.end());
  }
  EXPECT_EQ(pieces[0].seq_len, 15);
  EXPECT_EQ(pieces[1].seq_len, 5);
  EXPECT_EQ(pieces[2].seq_len, 13);
  EXPECT_EQ(pieces[3].seq_len, 7);
  EXPECT_EQ(inputs, b.inputs);
  EXPECT_EQ(targets, b.targets);
  EXPECT_EQ(segments_of(pieces), segments_of({b}));
}

TEST(SplitBatch, WhatCannotBeCutIsAnError) {
  // A segment longer than max_tokens.
  EXPECT_THROW(split_batch(one_row({0, 5, 25, 30}, 64), 16), std::runtime_error);
  // Rows of a multi-row batch longer than max_tokens.
  Batch dense;
  dense.rows = 2;
  dense.seq_len = 10;
  dense.inputs.assign(20, 1);
  EXPECT_THROW(split_batch(dense, 8), std::runtime_error);
  // A long row without segments.
  Batch plain = one_row({0, 30}, 64);
  plain.cu_seqlens.clear();
  EXPECT_THROW(split_batch(plain, 16), std::runtime_error);
  EXPECT_THROW(split_batch(plain, 0), std::runtime_error);
}

// The losses of a long document-isolated row equal the losses of its pieces (the stack that packs
// documents: looping, parallel lanes, XSA, partial RoPE): segments never see each other, and each
// keeps its position differences in its new row. The RoPE tables are fp32 (as the references'), so
// moved positions differ by float rounding of the angles: about 1e-9 here.
TEST(SplitBatch, TheModelScoresThePiecesAsTheWholeRow) {
  CpuModel<double> model(test::tiny_config("s1560"));
  test::perturbed_init(model, 11);
  model.set_looping(true);
  const Batch b = one_row({0, 7, 15, 20, 33, 40, 40, 40}, model.config().vocab_size);
  model.forward(b);
  const std::vector<double> whole(model.token_losses().begin(), model.token_losses().end());
  std::vector<double> pieces;
  for (const Batch& p : split_batch(b, 16)) {
    model.forward(p);
    pieces.insert(pieces.end(), model.token_losses().begin(), model.token_losses().end());
  }
  ASSERT_EQ(pieces.size(), whole.size());
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_NEAR(pieces[i], whole[i], 1e-7) << "target " << i;
}

}  // namespace
}  // namespace pgolf
