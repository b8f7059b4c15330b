// CpuModel behaviour: late-QAT straight-through, train/eval, per-token losses and weighted backward,
// the layer plan switch, row independence (position-0 rules per row), segment isolation, LoRA per
// row, and batch validation.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>

#include "backend/cpu/fake_quant.h"
#include "model/lora.h"
#include "tiny_models.h"

using namespace pgolf;

namespace {

// The CastedLinear matrices of a non-banked stack (what late QAT fake-quantizes).
std::vector<std::string> casted_linear_names(const ParamLayout& layout) {
  std::vector<std::string> out;
  for (const auto& s : layout.specs()) {
    const std::string& n = s.name;
    const bool block_matrix = n.find(".attn.c_") != std::string::npos || n.find(".attn.proj.") != std::string::npos ||
                              n.find(".mlp.fc.") != std::string::npos || n.find(".mlp.proj.") != std::string::npos;
    if (block_matrix || n == "bigram.proj.weight" || n == "ve_shared.proj.weight") out.push_back(n);
  }
  return out;
}

template <typename T>
bool bit_equal(std::span<const T> a, std::span<const T> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace

// w̃ = w + stopgrad(Q(w) − w): the forward equals the model with Q(w) loaded, and the gradient
// reaching w equals the gradient of that model at Q(w) (straight-through), bit for bit.
TEST(ModelModes, LateQatIsFakeQuantForwardWithStraightThroughGradient) {
  CpuModel<float> qat(test::tiny_config("s691"));
  test::perturbed_init(qat, 31);
  CpuModel<float> quantized(qat.config());
  std::copy(qat.params().all().begin(), qat.params().all().end(), quantized.params().all().begin());
  const auto names = casted_linear_names(qat.params().layout());
  ASSERT_EQ(names.size(), 4u * 6 + 2);  // 4 layers x 6 matrices + bigram.proj + ve_shared.proj
  for (const auto& n : names) {
    const auto& spec = qat.params().layout().spec(qat.params().layout().index_of(n));
    cpu::fake_quant_int6_rows(qat.params()[n].data(), quantized.params()[n].data(), spec.shape[0], spec.shape[1]);
  }
  const Batch batch = test::tiny_batch(qat.config().vocab_size, false);

  qat.set_train(true);
  qat.set_qat(true);
  qat.zero_grad();
  const float l_qat = qat.forward(batch);
  qat.backward();
  quantized.set_train(true);
  quantized.zero_grad();
  const float l_ref = quantized.forward(batch);
  quantized.backward();
  EXPECT_EQ(l_qat, l_ref);
  EXPECT_TRUE(bit_equal(qat.logits(), quantized.logits()));
  EXPECT_TRUE(bit_equal<float>(qat.grads().all(), quantized.grads().all()));

  // The fake quant really changes the model, and eval mode turns it off.
  CpuModel<float> exact(qat.config());
  std::copy(qat.params().all().begin(), qat.params().all().end(), exact.params().all().begin());
  const float l_exact = exact.forward(batch);
  EXPECT_NE(l_exact, l_qat);
  qat.set_train(false);
  EXPECT_EQ(qat.forward(batch), l_exact);
}

TEST(ModelModes, LateQatLeavesBanksExact) {
  // Banked stacks (s1560): the banks are not CastedLinear; QAT changes nothing.
  CpuModel<float> model(test::tiny_config("s1560"));
  test::perturbed_init(model, 32);
  const Batch batch = test::tiny_batch(model.config().vocab_size, true);
  const float exact = model.forward(batch);
  model.set_qat(true);
  EXPECT_EQ(model.forward(batch), exact);
}

TEST(ModelModes, TokenLossesAndWeightedBackward) {
  CpuModel<double> model(test::tiny_config("s562"));
  test::perturbed_init(model, 33);
  const Batch batch = test::tiny_batch(model.config().vocab_size, false);
  model.zero_grad();
  const double mean = model.forward(batch);
  double sum = 0;
  for (double l : model.token_losses()) sum += l;
  EXPECT_NEAR(mean, sum / static_cast<double>(batch.tokens()), 1e-12);
  model.backward();
  const std::vector<double> g_mean(model.grads().all().begin(), model.grads().all().end());
  model.zero_grad();
  model.forward(batch);
  std::vector<double> w(static_cast<size_t>(batch.tokens()), 1.0 / static_cast<double>(batch.tokens()));
  model.backward(w);
  for (size_t i = 0; i < g_mean.size(); ++i) ASSERT_NEAR(model.grads().all()[i], g_mean[i], 1e-15);
  // Gradients accumulate (PyTorch .grad semantics) until zero_grad().
  model.forward(batch);
  model.backward();
  for (size_t i = 0; i < g_mean.size(); ++i) ASSERT_NEAR(model.grads().all()[i], 2 * g_mean[i], 1e-14);
}

TEST(ModelModes, LayerPlanSwitch) {
  CpuModel<float> model(test::tiny_config("s1560"));
  EXPECT_EQ(model.num_virtual_layers(), 5);
  model.set_looping(true);
  EXPECT_EQ(model.num_virtual_layers(), 7);
  EXPECT_EQ(model.plan().encoder, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(model.plan().decoder, (std::vector<int>{1, 2, 3, 4}));
  test::perturbed_init(model, 34);
  const Batch batch = test::tiny_batch(model.config().vocab_size, false);
  const float looped = model.forward(batch);
  EXPECT_EQ(model.physical_layer(4), 2);
  EXPECT_FALSE(model.is_parallel(4));
  EXPECT_TRUE(model.is_parallel(5));
  model.set_looping(false);
  EXPECT_NE(model.forward(batch), looped);
  EXPECT_EQ(model.num_virtual_layers(), 5);
}

// Rows are independent sequences: position 0 of every row gets the bigram reserved bucket and the
// smear's zero predecessor, even when the row continues the previous row's stream.
TEST(ModelModes, RowsAreIndependentIncludingPositionZeroRules) {
  for (const char* stack : {"s691", "s600"}) {
    CpuModel<double> model(test::tiny_config(stack));
    test::perturbed_init(model, 35);
    const Batch two = test::tiny_batch(model.config().vocab_size, false);
    model.forward(two);
    const int64_t V = model.config().vocab_size, T = two.seq_len;
    const std::vector<double> row1(model.logits().begin() + T * V, model.logits().end());
    Batch one;
    one.rows = 1;
    one.seq_len = T;
    one.inputs.assign(two.inputs.begin() + T, two.inputs.end());
    one.targets.assign(two.targets.begin() + T, two.targets.end());
    model.forward(one);
    ASSERT_EQ(model.logits().size(), row1.size());
    for (size_t i = 0; i < row1.size(); ++i) ASSERT_NEAR(model.logits()[i], row1[i], 1e-12) << stack;
  }
}

// Attention is confined to its segment and RoPE is relative: in a packed row cut at position 5,
// the logits of positions 5.. equal those of the same tokens as their own row (s1560 has no
// bigram/smear, the only cross-position terms outside attention). Equal up to the fp32 cos/sin
// tables (the references' numerics), whose rounding (6e-8 relative) differs between absolute
// positions p and p+5: 1e-6 on O(1) logits; attending across the cut would move them by O(0.1).
TEST(ModelModes, SegmentsIsolateAttention) {
  CpuModel<double> model(test::tiny_config("s1560"));
  test::perturbed_init(model, 36);
  model.set_looping(true);
  Batch packed = test::tiny_batch(model.config().vocab_size, false);
  packed.rows = 1;
  packed.seq_len = 24;
  packed.cu_seqlens = {0, 5, 24};
  model.forward(packed);
  const int64_t V = model.config().vocab_size;
  const std::vector<double> tail(model.logits().begin() + 5 * V, model.logits().end());
  Batch alone;
  alone.rows = 1;
  alone.seq_len = 19;
  alone.inputs.assign(packed.inputs.begin() + 5, packed.inputs.end());
  alone.targets.assign(packed.targets.begin() + 5, packed.targets.end());
  model.forward(alone);
  for (size_t i = 0; i < tail.size(); ++i) ASSERT_NEAR(model.logits()[i], tail[i], 1e-6);
}

TEST(ModelModes, LoraAdaptersArePerRow) {
  CpuModel<double> model(test::tiny_config("s1560"));
  test::perturbed_init(model, 37);
  model.set_looping(true);
  LoraConfig lc;
  lc.rank = 2;
  lc.targets = {true, true, true, true, true, true};
  LoraAdapters<double> lora(model.config(), lc, 2, model.num_virtual_layers());
  Rng rng(1);
  lora.reset(rng);
  model.set_lora(&lora);
  const Batch batch = test::tiny_batch(model.config().vocab_size, false);
  // Freshly reset adapters (B = 0) leave the model unchanged.
  const double with_reset = model.forward(batch);
  model.set_lora(nullptr);
  EXPECT_EQ(model.forward(batch), with_reset);
  model.set_lora(&lora);
  // Changing row 0's adapters changes row 0's losses only.
  const auto* head = lora.find(LoraTarget::Head, 0);
  const auto* q3 = lora.find(LoraTarget::Q, 3);
  model.forward(batch);
  const std::vector<double> before(model.token_losses().begin(), model.token_losses().end());
  for (int64_t k = 0; k < head->out * lc.rank; ++k) lora.params()[head->b_offset + k] = 0.3;  // row 0's B
  for (int64_t k = 0; k < q3->out * lc.rank; ++k) lora.params()[q3->b_offset + k] = -0.2;
  model.forward(batch);
  const int64_t T = batch.seq_len;
  bool row0_changed = false;
  for (int64_t i = 0; i < T; ++i) row0_changed |= model.token_losses()[i] != before[i];
  EXPECT_TRUE(row0_changed);
  for (int64_t i = T; i < 2 * T; ++i) EXPECT_EQ(model.token_losses()[i], before[i]) << "row 1 at " << i - T;
  // A batch of fewer rows uses the first adapters: row 0 alone scores as row 0 of the pair.
  const std::vector<double> pair(model.token_losses().begin(), model.token_losses().end());
  Batch first = batch;
  first.rows = 1;
  first.inputs.resize(static_cast<size_t>(T));
  first.targets.resize(static_cast<size_t>(T));
  model.forward(first);
  for (int64_t i = 0; i < T; ++i) EXPECT_NEAR(model.token_losses()[i], pair[i], 1e-12) << "row 0 alone at " << i;
  // More rows than adapters, or another plan, are errors.
  Batch three = batch;
  three.rows = 3;
  three.seq_len = 8;
  EXPECT_THROW(model.forward(three), Error);
  model.set_looping(false);
  EXPECT_THROW(model.forward(batch), Error);
}

// set_bf16_norm_grads rounds d n, d m and d h where one product writes them alone: it leaves the forward
// alone, moves the gradients by bf16 roundings (each ≤ 2⁻⁹ relative; ~9 of them on the longest path of
// this 4-layer model, in quadrature ≤ 3·2⁻⁹ < 1e-2 of the whole gradient vector), and changes nothing when
// LoRA adapters add to every one of them; an adapter missing on the MLP brings d m's rounding back.
// lora_layout: every value belongs to exactly one adapter row's A or B; the q/k/v/o adapters present in
// a slot keep their A side by side per row; the row segments cover exactly the values of rows [0, n).
TEST(ModelModes, LoraLayoutGroupsTheAttentionAdapters) {
  const ModelConfig cfg = test::tiny_config("s1560");
  for (const std::array<bool, kNumLoraTargets>& targets :
       {std::array<bool, kNumLoraTargets>{true, true, true, true, true, true},
        std::array<bool, kNumLoraTargets>{true, false, true, false, false, true},
        std::array<bool, kNumLoraTargets>{false, false, false, true, true, false}}) {
    LoraConfig lc;
    lc.rank = 2;
    lc.targets = targets;
    const int64_t rows = 3;
    const int slots = 4;
    std::vector<LoraAdapterLayout> layout;
    const int64_t total = lora_layout(cfg, lc, rows, slots, layout);
    std::vector<int> owner(static_cast<size_t>(total), 0);
    std::vector<int> row_of(static_cast<size_t>(total), -1);
    for (const LoraAdapterLayout& a : layout) {
      if (a.a_offset < 0) continue;
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t k = 0; k < lc.rank * a.in; ++k) {
          ++owner[static_cast<size_t>(a.a_offset + b * a.a_stride + k)];
          row_of[static_cast<size_t>(a.a_offset + b * a.a_stride + k)] = static_cast<int>(b);
        }
        for (int64_t k = 0; k < a.out * lc.rank; ++k) {
          ++owner[static_cast<size_t>(a.b_offset + b * a.out * lc.rank + k)];
          row_of[static_cast<size_t>(a.b_offset + b * a.out * lc.rank + k)] = static_cast<int>(b);
        }
      }
    }
    for (int64_t i = 0; i < total; ++i) ASSERT_EQ(owner[static_cast<size_t>(i)], 1) << "value " << i;
    int group = 0;
    for (LoraTarget t : kLoraGroupTargets) group += lc.on(t) ? 1 : 0;
    for (int s = 0; s < slots; ++s) {
      int index = 0;
      int64_t lead = -1;
      for (LoraTarget t : kLoraGroupTargets) {
        const LoraAdapterLayout& a = layout[static_cast<size_t>(t) * slots + s];
        if (!lc.on(t)) {
          EXPECT_EQ(a.a_offset, -1);
          continue;
        }
        if (index == 0) lead = a.a_offset;
        EXPECT_EQ(a.group_index, index);
        EXPECT_EQ(a.group_size, group);
        EXPECT_EQ(a.a_stride, group * lc.rank * a.in);
        EXPECT_EQ(a.a_offset, lead + index * lc.rank * a.in);
        ++index;
      }
    }
    for (int64_t n = 0; n <= rows; ++n) {
      std::vector<int> covered(static_cast<size_t>(total), 0);
      for (const LoraRowSegment& seg : lora_row_segments(layout, lc.rank))
        for (int64_t k = 0; k < n * seg.per_row; ++k) ++covered[static_cast<size_t>(seg.offset + k)];
      for (int64_t i = 0; i < total; ++i)
        ASSERT_EQ(covered[static_cast<size_t>(i)], row_of[static_cast<size_t>(i)] < n ? 1 : 0) << "value " << i << ", n " << n;
    }
  }
}

TEST(ModelModes, Bf16NormGradientsRoundOnlyTheGradientsOneProductWrites) {
  CpuModel<double> model(test::tiny_config("s691"));
  test::perturbed_init(model, 43);
  EXPECT_FALSE(model.bf16_norm_grads());
  const Batch batch = test::tiny_batch(model.config().vocab_size, false);
  auto run = [&](bool rounded) {
    model.set_bf16_norm_grads(rounded);
    model.zero_grad();
    const double loss = model.forward(batch);
    model.backward();
    return std::make_pair(loss, std::vector<double>(model.grads().all().begin(), model.grads().all().end()));
  };
  const auto [loss_fp, grads_fp] = run(false);
  const auto [loss_bf, grads_bf] = run(true);
  EXPECT_EQ(loss_bf, loss_fp);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < grads_fp.size(); ++i)
    diff += (grads_bf[i] - grads_fp[i]) * (grads_bf[i] - grads_fp[i]), norm += grads_fp[i] * grads_fp[i];
  const double rel = std::sqrt(diff / norm);
  EXPECT_GT(rel, 0.0);
  EXPECT_LT(rel, 1e-2);

  for (const bool with_mlp : {true, false}) {
    LoraConfig lc;
    lc.rank = 2;
    lc.targets = {true, true, true, true, with_mlp, true};
    LoraAdapters<double> lora(model.config(), lc, batch.rows, model.num_virtual_layers());
    Rng rng(5);
    lora.reset(rng);
    for (auto& x : lora.params()) x += 0.05 * rng.normal();
    model.set_lora(&lora);
    const auto lora_fp = run(false).second, lora_bf = run(true).second;
    if (with_mlp) EXPECT_EQ(lora_bf, lora_fp) << "every norm gradient has an adapter term: nothing to round";
    else EXPECT_NE(lora_bf, lora_fp) << "d m without an adapter is rounded";
    model.set_lora(nullptr);
  }
}

TEST(ModelModes, BatchValidationNamesTheProblem) {
  CpuModel<float> model(test::tiny_config("baseline"));
  Batch b = test::tiny_batch(model.config().vocab_size, false);
  b.inputs[3] = 64;
  EXPECT_THROW(model.forward(b), Error);
  b = test::tiny_batch(model.config().vocab_size, false);
  b.cu_seqlens = {0, 10, 20, 24};  // [10, 20) crosses the row boundary at 12
  try {
    model.forward(b);
    FAIL() << "a segment across rows must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("crosses a row boundary"), std::string::npos) << e.what();
  }
  b.cu_seqlens = {0, 12, 23};
  EXPECT_THROW(model.forward(b), Error);
  b = test::tiny_batch(model.config().vocab_size, false);
  b.targets.pop_back();
  EXPECT_THROW(model.forward(b), Error);
  b.targets.clear();  // no targets: logits only
  EXPECT_EQ(model.forward(b), 0.0f);
  EXPECT_EQ(model.logits().size(), static_cast<size_t>(24 * 64));
  EXPECT_THROW(model.backward(), Error);
}

// Every op splits its work by shape, never by team size (gemm panels, attention work items,
// fixed-order column sums), so one or two threads give bit-identical results — also when OpenMP's
// dynamic teams shrink under load.
TEST(ModelModes, ResultsDoNotDependOnThreadCount) {
  // Large enough for every parallel path: GEMM panels and attention work items (N·q_dim ≥ 32k).
  Config c = Config::load("s1560");
  c.set("vocab_size", int64_t{256});
  c.set("model_dim", int64_t{64});
  c.set("num_heads", int64_t{4});
  c.set("num_kv_heads", int64_t{2});
  c.set("num_layers", int64_t{5});
  c.set("xsa_last_n", int64_t{5});
  c.set("loop_start", int64_t{1});
  c.set("loop_end", int64_t{2});
  c.set("parallel_start_layer", int64_t{3});
  CpuModel<float> model(ModelConfig::from_config(c));
  test::perturbed_init(model, 41);
  model.set_looping(true);
  Batch batch;
  batch.rows = 2;
  batch.seq_len = 256;
  Rng rng(3);
  for (int64_t i = 0; i < batch.tokens(); ++i) {
    batch.inputs.push_back(static_cast<int32_t>(rng.below(256)));
    batch.targets.push_back(static_cast<int32_t>(rng.below(256)));
  }
  batch.cu_seqlens = {0, 100, 256, 300, 512};
  const int dynamic = omp_get_dynamic(), threads = omp_get_max_threads();
  omp_set_dynamic(0);
  auto run = [&](int n) {
    omp_set_num_threads(n);
    model.zero_grad();
    const float loss = model.forward(batch);
    model.backward();
    return std::make_pair(loss, std::vector<float>(model.grads().all().begin(), model.grads().all().end()));
  };
  const auto one = run(1), two = run(2);
  omp_set_num_threads(threads);
  omp_set_dynamic(dynamic);
  EXPECT_EQ(std::memcmp(&one.first, &two.first, sizeof(float)), 0) << one.first << " vs " << two.first;
  ASSERT_EQ(one.second.size(), two.second.size());
  EXPECT_EQ(std::memcmp(one.second.data(), two.second.data(), one.second.size() * sizeof(float)), 0);
}
