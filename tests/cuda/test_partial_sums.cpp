// finish_partial_sums against fp64 column sums: widths narrower and wider than one block's columns,
// block counts of the row kernels (528) and of the head kernels (2048), null targets before, between
// and after real ones (the real targets must still get their own columns), and the same bits on a
// second run (the reduction order depends on the sizes only).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/partial_sums.h"
#include "op_test_util.h"

namespace pgolf::test {
namespace {

using cuda::DeviceBuffer;

class PartialSumsTest : public CudaTest {};

struct FinishCase {
  int blocks;
  std::vector<int> widths;  // one target per width; negative: a null target of that width
};

TEST_F(PartialSumsTest, FinishAddsColumnSumsInAFixedOrder) {
  const FinishCase cases[] = {
      {1, {5}}, {7, {3}}, {528, {512, 512}}, {2048, {8}}, {528, {-1, 1, -1}}, {300, {40, -5, 2, 4}}, {33, {-33, 1030}}};
  for (const FinishCase& c : cases) {
    int width = 0;
    for (const int w : c.widths) width += std::abs(w);
    const std::string tag = "blocks" + std::to_string(c.blocks) + "_width" + std::to_string(width);
    SCOPED_TRACE(tag);
    Rng rng(1200 + c.blocks + width);
    const auto partials = random_f32_values(static_cast<size_t>(c.blocks) * width, rng);
    DeviceBuffer<float> d_partials(partials);
    std::vector<std::vector<float>> init;
    std::vector<DeviceBuffer<float>> dst;
    for (const int w : c.widths) {
      init.push_back(random_f32_values(static_cast<size_t>(std::abs(w)), rng));
      dst.emplace_back(init.back());
    }
    auto run = [&] {
      std::vector<cuda::SumTarget> targets;
      for (size_t i = 0; i < c.widths.size(); ++i) {
        dst[i].upload(init[i]);
        targets.push_back({c.widths[i] > 0 ? dst[i].data() : nullptr, std::abs(c.widths[i])});
      }
      switch (targets.size()) {  // the launcher takes an initializer list
        case 1:
          cuda::finish_partial_sums(d_partials.data(), c.blocks, {targets[0]}, nullptr);
          break;
        case 2:
          cuda::finish_partial_sums(d_partials.data(), c.blocks, {targets[0], targets[1]}, nullptr);
          break;
        case 3:
          cuda::finish_partial_sums(d_partials.data(), c.blocks, {targets[0], targets[1], targets[2]}, nullptr);
          break;
        default:
          cuda::finish_partial_sums(d_partials.data(), c.blocks, {targets[0], targets[1], targets[2], targets[3]},
                                    nullptr);
      }
      sync_device();
      std::vector<std::vector<float>> out;
      for (const DeviceBuffer<float>& d : dst) out.push_back(d.download());
      return out;
    };
    const auto first = run(), second = run();
    int begin = 0;
    for (size_t i = 0; i < c.widths.size(); ++i) {
      const int w = std::abs(c.widths[i]);
      const std::string what = tag + "_target" + std::to_string(i);
      if (c.widths[i] > 0) {
        // naive: the fp32 sum over the blocks in block order; ref: the same in fp64.
        std::vector<float> naive(init[i]);
        std::vector<double> ref(init[i].begin(), init[i].end());
        for (int j = 0; j < w; ++j) {
          float s = 0.f;
          double s_ref = 0.0;
          for (int b = 0; b < c.blocks; ++b) {
            s += partials[static_cast<size_t>(b) * width + begin + j];
            s_ref += partials[static_cast<size_t>(b) * width + begin + j];
          }
          naive[j] += s;
          ref[j] += s_ref;
        }
        expect_within_naive(what, first[i], naive, ref, kF32Bound);
        EXPECT_EQ(std::memcmp(first[i].data(), second[i].data(), sizeof(float) * w), 0)
            << what << ": a second run gave different bits";
      }
      begin += w;
    }
  }
}

}  // namespace
}  // namespace pgolf::test
