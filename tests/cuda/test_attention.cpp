// Flash attention (forward and backward) against an fp64 host reference, bounded by a naive
// same-precision host computation (ENGINEERING §4, FlashAttention's own rule): bf16 inputs, fp32
// arithmetic, and bf16 rounding of every intermediate a bf16 implementation stores — P, O, dP, dS —
// and of the outputs. The kernels round P, dS and the outputs at the same points and keep S and dP
// in fp32, so their error should not exceed the naive one; k = 2 leaves room for a different
// rounding of near-ties (FlashAttention's tests use 2). The LSE is fp32 in both; the kernel's comes
// from the hardware exp2/log2 approximations (about 2 ulp) and tensor-core fp32 accumulation where
// the naive loop uses libm and sequential sums: k = 4. Both forward and both backward implementations
// (mma.sync and Hopper's wgmma) are held to these bounds: they round at the same points.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/xsa.h"
#include "core/error.h"
#include "cuda_test_util.h"

namespace pgolf::test {
namespace {

using cuda::AttentionShape;
using cuda::AttentionTuning;
using cuda::DeviceBuffer;
constexpr int kDh = cuda::kAttentionHeadDim;

struct AttentionInputs {
  int tokens = 0, heads = 0, kv_heads = 0;
  std::vector<int32_t> cu;
  std::vector<float> q, k, v, d_o;  // bf16 values; q [N, H, 64], k/v [N, Hkv, 64], d_o like q
};

template <typename Acc>
struct AttentionOutputs {
  std::vector<Acc> o, lse, dq, dk, dv;  // lse [H, N]
};

AttentionInputs make_inputs(std::vector<int32_t> cu, int heads, int kv_heads, uint64_t seed) {
  AttentionInputs in;
  in.tokens = cu.back(), in.heads = heads, in.kv_heads = kv_heads, in.cu = std::move(cu);
  Rng rng(seed);
  in.q = random_bf16_values(size_t(in.tokens) * heads * kDh, rng, 1.5);  // 1.5: pgolf's initial q gain
  in.k = random_bf16_values(size_t(in.tokens) * kv_heads * kDh, rng);
  in.v = random_bf16_values(size_t(in.tokens) * kv_heads * kDh, rng);
  in.d_o = random_bf16_values(size_t(in.tokens) * heads * kDh, rng);
  return in;
}

std::vector<int32_t> cu_from_lengths(const std::vector<int>& lengths) {
  std::vector<int32_t> cu{0};
  for (int len : lengths) cu.push_back(cu.back() + len);
  return cu;
}

// Causal attention per segment, forward and backward, with Acc arithmetic; kRound rounds the stored
// intermediates and the outputs to bf16 (the naive computation), otherwise nothing is rounded.
template <typename Acc, bool kRound>
AttentionOutputs<Acc> host_attention(const AttentionInputs& in) {
  const int n = in.tokens, h_count = in.heads, kv_count = in.kv_heads, group = h_count / kv_count;
  auto round = [](Acc x) -> Acc { return kRound ? static_cast<Acc>(round_to_bf16(static_cast<float>(x))) : x; };
  auto qp = [&](int t, int h) { return &in.q[(size_t(t) * h_count + h) * kDh]; };
  auto dop = [&](int t, int h) { return &in.d_o[(size_t(t) * h_count + h) * kDh]; };
  auto kp = [&](int t, int g) { return &in.k[(size_t(t) * kv_count + g) * kDh]; };
  auto vp = [&](int t, int g) { return &in.v[(size_t(t) * kv_count + g) * kDh]; };
  const Acc scale = Acc(1) / std::sqrt(Acc(kDh));

  AttentionOutputs<Acc> out;
  out.o.assign(size_t(n) * h_count * kDh, 0), out.dq.assign(out.o.size(), 0);
  out.lse.assign(size_t(n) * h_count, 0);
  out.dk.assign(size_t(n) * kv_count * kDh, 0), out.dv.assign(out.dk.size(), 0);
  const int segments = static_cast<int>(in.cu.size()) - 1;

#pragma omp parallel for schedule(dynamic)
  for (int item = 0; item < segments * kv_count; ++item) {
    const int seg = item / kv_count, g = item % kv_count;
    const int start = in.cu[seg], len = in.cu[seg + 1] - start;
    std::vector<Acc> s(len), p(len), o(kDh), dq(kDh);
    std::vector<Acc> dk(size_t(len) * kDh, 0), dv(size_t(len) * kDh, 0);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int i = 0; i < len; ++i) {
        const int t = start + i;
        Acc mx = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          Acc dot = 0;
          for (int d = 0; d < kDh; ++d) dot += Acc(qp(t, h)[d]) * Acc(kp(start + j, g)[d]);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        Acc sum = 0;
        for (int j = 0; j <= i; ++j) sum += std::exp(s[j] - mx);
        const Acc lse = mx + std::log(sum);
        std::fill(o.begin(), o.end(), Acc(0));
        for (int j = 0; j <= i; ++j) {
          p[j] = round(std::exp(s[j] - lse));
          for (int d = 0; d < kDh; ++d) o[d] += p[j] * Acc(vp(start + j, g)[d]);
        }
        Acc row_delta = 0;  // D = rowsum(dO ∘ O), from the O this computation produced
        for (int d = 0; d < kDh; ++d) {
          o[d] = round(o[d]);
          out.o[(size_t(t) * h_count + h) * kDh + d] = o[d];
          row_delta += Acc(dop(t, h)[d]) * o[d];
        }
        out.lse[size_t(h) * n + t] = lse;
        std::fill(dq.begin(), dq.end(), Acc(0));
        for (int j = 0; j <= i; ++j) {
          Acc dp = 0;
          for (int d = 0; d < kDh; ++d) dp += Acc(dop(t, h)[d]) * Acc(vp(start + j, g)[d]);
          const Acc ds = round(p[j] * (round(dp) - row_delta) * scale);
          for (int d = 0; d < kDh; ++d) {
            dq[d] += ds * Acc(kp(start + j, g)[d]);
            dk[size_t(j) * kDh + d] += ds * Acc(qp(t, h)[d]);
            dv[size_t(j) * kDh + d] += p[j] * Acc(dop(t, h)[d]);
          }
        }
        for (int d = 0; d < kDh; ++d) out.dq[(size_t(t) * h_count + h) * kDh + d] = round(dq[d]);
      }
    }
    for (int j = 0; j < len; ++j) {
      for (int d = 0; d < kDh; ++d) {
        out.dk[(size_t(start + j) * kv_count + g) * kDh + d] = round(dk[size_t(j) * kDh + d]);
        out.dv[(size_t(start + j) * kv_count + g) * kDh + d] = round(dv[size_t(j) * kDh + d]);
      }
    }
  }
  return out;
}

// The device inputs of one case and a forward + backward run into freshly poisoned outputs.
struct DeviceAttention {
  const AttentionInputs& in;
  DeviceBuffer<int32_t> cu;
  DeviceBuffer<__nv_bfloat16> q, k, v, d_o;
  AttentionShape shape;

  explicit DeviceAttention(const AttentionInputs& inputs)
      : in(inputs),
        cu(inputs.cu),
        q(to_device_bf16(inputs.q)),
        k(to_device_bf16(inputs.k)),
        v(to_device_bf16(inputs.v)),
        d_o(to_device_bf16(inputs.d_o)) {
    shape.total_tokens = in.tokens, shape.num_heads = in.heads, shape.num_kv_heads = in.kv_heads;
    shape.cu_seqlens = cu.data(), shape.num_segments = static_cast<int>(in.cu.size()) - 1;
  }

  AttentionOutputs<float> run(const AttentionTuning& tuning) {
    auto o = poisoned_buffer<__nv_bfloat16>(in.q.size());
    auto lse = poisoned_buffer<float>(size_t(in.tokens) * in.heads);
    auto dq = poisoned_buffer<__nv_bfloat16>(in.q.size());
    auto dk = poisoned_buffer<__nv_bfloat16>(in.k.size());
    auto dv = poisoned_buffer<__nv_bfloat16>(in.v.size());
    const size_t ws_bytes = cuda::attention_backward_workspace_bytes(shape);
    auto ws = poisoned_buffer<unsigned char>(ws_bytes);
    cuda::attention_forward(shape, q.data(), k.data(), v.data(), o.data(), lse.data(), nullptr, tuning);
    cuda::attention_backward(shape, q.data(), k.data(), v.data(), o.data(), lse.data(), d_o.data(), dq.data(),
                             dk.data(), dv.data(), ws.data(), ws_bytes, nullptr, tuning);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    return {from_device_bf16(o), lse.download(), from_device_bf16(dq), from_device_bf16(dk), from_device_bf16(dv)};
  }
};

// The mma.sync forward and the backward at both block shapes (and the deterministic dQ), then the
// wgmma forwards at each block shape and key tile they take (4 or 8 warps with 64 or 128 keys;
// warp-specialized, 12 consumer warps with 64 or 128 keys), each followed by the mma.sync
// backward, then the wgmma backward at its three block shapes (one, two or three warpgroups) and the
// warp-specialized backward after the default forward.
std::vector<AttentionTuning> tunings_under_test() {
  constexpr auto mma = cuda::AttentionForwardKernel::mma_sync;
  constexpr auto mma_bwd = cuda::AttentionBackwardKernel::mma_sync;
  std::vector<AttentionTuning> tunings{{4, 4, false, mma, mma_bwd}, {8, 8, false, mma, mma_bwd}, {4, 8, true, mma, mma_bwd}};
  constexpr auto wgmma = cuda::AttentionForwardKernel::wgmma, wgmma_ws = cuda::AttentionForwardKernel::wgmma_ws;
  const int forward_shapes[][3] = {{int(wgmma), 4, 64},  {int(wgmma), 4, 128},     {int(wgmma), 8, 64},
                                   {int(wgmma), 8, 128}, {int(wgmma_ws), 12, 64}, {int(wgmma_ws), 12, 128}};
  for (const auto& [kernel, warps, key_tile] : forward_shapes) {
    AttentionTuning t;
    t.forward_kernel = static_cast<cuda::AttentionForwardKernel>(kernel);
    t.forward_warps = warps;
    t.forward_key_tile = key_tile;
    t.backward_warps = 8;
    t.backward_kernel = mma_bwd;
    tunings.push_back(t);
  }
  for (int warps : {4, 8, 12}) {
    AttentionTuning t;
    t.backward_warps = warps;
    t.backward_kernel = cuda::AttentionBackwardKernel::wgmma;
    tunings.push_back(t);
  }
  AttentionTuning ws;  // the warp-specialized backward: 12 warps only
  ws.backward_warps = 12;
  ws.backward_kernel = cuda::AttentionBackwardKernel::wgmma_ws;
  tunings.push_back(ws);
  // Each forward as named, whatever the size of the test shapes (the fallback has its own test).
  for (AttentionTuning& t : tunings) t.forward_ws_min_waves = 0;
  return tunings;
}

std::string tuning_label(const AttentionTuning& t) {
  const std::string shape = std::to_string(t.forward_warps) + "_keys" + std::to_string(t.forward_key_tile);
  std::string label = "mma_fw" + std::to_string(t.forward_warps);
  if (t.forward_kernel == cuda::AttentionForwardKernel::wgmma) label = "wgmma_fw" + shape;
  if (t.forward_kernel == cuda::AttentionForwardKernel::wgmma_ws) label = "wgmma_ws_fw" + shape;
  if (t.backward_kernel == cuda::AttentionBackwardKernel::mma_sync) label += "_bw";
  else label += t.backward_kernel == cuda::AttentionBackwardKernel::wgmma ? "_wgmma_bw" : "_wgmma_ws_bw";
  label += std::to_string(t.backward_warps);
  return t.deterministic ? label + "_det" : label;
}

void check_case(const std::string& name, const AttentionInputs& in) {
  std::printf("  case %s: %d tokens, %zu segments, H %d, Hkv %d\n", name.c_str(), in.tokens, in.cu.size() - 1,
              in.heads, in.kv_heads);
  const AttentionOutputs<double> ref = host_attention<double, false>(in);
  const AttentionOutputs<float> naive = host_attention<float, true>(in);
  DeviceAttention dev(in);
  for (const AttentionTuning& tuning : tunings_under_test()) {
    const std::string label = tuning_label(tuning);
    SCOPED_TRACE(label);
    const std::string tag = name + "/" + label + "/";
    const AttentionOutputs<float> got = dev.run(tuning);
    expect_within_naive(tag + "o", got.o, naive.o, ref.o, 2.0);
    expect_within_naive(tag + "lse", got.lse, naive.lse, ref.lse, 4.0);
    expect_within_naive(tag + "dq", got.dq, naive.dq, ref.dq, 2.0);
    expect_within_naive(tag + "dk", got.dk, naive.dk, ref.dk, 2.0);
    expect_within_naive(tag + "dv", got.dv, naive.dv, ref.dv, 2.0);

    // A second run gives the same bits, except the atomic dq, whose fp32 sums may come in another order.
    const AttentionOutputs<float> again = dev.run(tuning);
    EXPECT_EQ(again.o, got.o) << "forward output differs between two runs (a race?)";
    EXPECT_EQ(again.lse, got.lse) << "LSE differs between two runs (a race?)";
    EXPECT_EQ(again.dk, got.dk) << "dk differs between two runs (a race?)";
    EXPECT_EQ(again.dv, got.dv) << "dv differs between two runs (a race?)";
    if (tuning.deterministic) {
      EXPECT_EQ(again.dq, got.dq) << "deterministic dq differs between two runs";
    }
  }
}

class AttentionTest : public CudaTest {};

TEST_F(AttentionTest, DenseRowsOfOddLength) {
  check_case("dense_3x257", make_inputs(cu_from_lengths({257, 257, 257}), 8, 4, 101));
}

// Boundaries anywhere, segments of length 1 and 0, lengths just off the tile sizes, and the
// FlashAttention padding of cu_seqlens with the total.
TEST_F(AttentionTest, VarlenAwkwardSegments) {
  std::vector<int32_t> cu = cu_from_lengths({1, 130, 7, 1, 64, 65, 0, 300, 1, 129, 500, 2, 127});
  for (int i = 0; i < 3; ++i) cu.push_back(cu.back());
  check_case("varlen_awkward", make_inputs(cu, 8, 4, 102));
}

TEST_F(AttentionTest, LongSegmentsUpToSequenceLength) {
  check_case("long_2048_999", make_inputs(cu_from_lengths({2048, 999}), 8, 4, 103));
}

TEST_F(AttentionTest, ManyShortDocuments) {
  Rng rng(104);
  std::vector<int> lengths;
  for (int total = 0; total < 3000;) lengths.push_back(1 + static_cast<int>(rng.below(40))), total += lengths.back();
  check_case("many_short_docs", make_inputs(cu_from_lengths(lengths), 8, 4, 105));
}

TEST_F(AttentionTest, OtherHeadGroupings) {
  check_case("h4_kv1", make_inputs(cu_from_lengths({100, 37, 200}), 4, 1, 106));
  check_case("h2_kv2", make_inputs(cu_from_lengths({100, 37, 200}), 2, 2, 107));
}

// AttentionShape::query_begin: each forward block (16 · forward_warps queries) that ends before its
// segment's first needed query is skipped, every other block runs as in the full forward. So every
// row of a block that runs has the full forward's bits (o and lse), and the rows of skipped blocks
// keep the poison. Starts inside a tile, at 0, past the end, and one short of the end.
TEST_F(AttentionTest, SelectedQueryTilesMatchTheFullForward) {
  const std::vector<int32_t> cu = cu_from_lengths({300, 64, 1, 200, 2048});
  const std::vector<int32_t> begin = {236, 0, 1, 137, 1984};
  const AttentionInputs in = make_inputs(cu, 4, 2, 109);
  DeviceAttention dev(in);
  DeviceBuffer<int32_t> begin_device(begin);
  const int H = in.heads, N = in.tokens;
  for (const AttentionTuning& tuning : tunings_under_test()) {
    if (tuning.backward_kernel != cuda::AttentionBackwardKernel::mma_sync) continue;  // the same forwards again
    SCOPED_TRACE(tuning_label(tuning));
    auto run = [&](const AttentionShape& shape, std::vector<float>& o, std::vector<float>& lse) {
      auto o_dev = poisoned_buffer<__nv_bfloat16>(in.q.size());
      auto lse_dev = poisoned_buffer<float>(size_t(N) * H);
      cuda::attention_forward(shape, dev.q.data(), dev.k.data(), dev.v.data(), o_dev.data(), lse_dev.data(), nullptr,
                              tuning);
      PG_CUDA_CHECK(cudaDeviceSynchronize());
      o = from_device_bf16(o_dev);
      lse = lse_dev.download();
    };
    std::vector<float> full_o, full_lse, o, lse;
    run(dev.shape, full_o, full_lse);
    AttentionShape selected = dev.shape;
    selected.query_begin = begin_device.data();
    run(selected, o, lse);
    const int block_rows = 16 * tuning.forward_warps;
    // The end of the query tile of row i of a segment of `length` rows: tiles are aligned to the
    // segment's start, or (warp-specialized kernel) to its end.
    const bool end_aligned = tuning.forward_kernel == cuda::AttentionForwardKernel::wgmma_ws;
    auto tile_end = [&](int i, int length) {
      return end_aligned ? length - (length - 1 - i) / block_rows * block_rows
                         : std::min(length, (i / block_rows + 1) * block_rows);
    };
    int64_t skipped = 0, compared = 0;
    for (size_t seg = 0; seg + 1 < cu.size(); ++seg) {
      const int length = cu[seg + 1] - cu[seg];
      for (int i = 0; i < length; ++i) {
        const int t = cu[seg] + i;
        for (int h = 0; h < H; ++h) {
          const size_t at = (size_t(t) * H + h) * kDh;
          const std::vector<float> row(o.begin() + at, o.begin() + at + kDh);
          const std::vector<float> want(full_o.begin() + at, full_o.begin() + at + kDh);
          const float l = lse[size_t(h) * N + t], want_l = full_lse[size_t(h) * N + t];
          if (tile_end(i, length) > begin[seg]) {  // its block runs
            ASSERT_EQ(std::memcmp(row.data(), want.data(), kDh * sizeof(float)), 0) << "o, segment " << seg << " row " << i;
            ASSERT_EQ(std::memcmp(&l, &want_l, sizeof(float)), 0) << "lse, segment " << seg << " row " << i;
            ++compared;
          } else {
            ASSERT_TRUE(std::isnan(row[0]) && std::isnan(l)) << "segment " << seg << " row " << i << " was computed";
            ++skipped;
          }
        }
      }
    }
    EXPECT_GT(skipped, 3 * compared) << "most query tiles are skipped";
  }
  // The backward needs every query.
  AttentionShape selected = dev.shape;
  selected.query_begin = begin_device.data();
  DeviceBuffer<__nv_bfloat16> o(in.q.size()), dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  DeviceBuffer<float> lse(size_t(N) * H);
  const size_t ws_bytes = cuda::attention_backward_workspace_bytes(dev.shape);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  EXPECT_THROW(cuda::attention_backward(selected, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(),
                                        dev.d_o.data(), dq.data(), dk.data(), dv.data(), ws.data(), ws_bytes, nullptr),
               Error);
}

// The default warp-specialized forward on a shape with fewer of its blocks than two waves of the GPU's
// multiprocessors runs the wgmma forward (8 warps, 64-key tiles): the same bits as that kernel named;
// on a shape with enough blocks, the warp-specialized kernel's bits.
TEST_F(AttentionTest, WarpSpecializedForwardFallsBackOnSmallShapes) {
  auto forward = [](DeviceAttention& dev, const AttentionTuning& t) {
    auto o = poisoned_buffer<__nv_bfloat16>(dev.in.q.size());
    auto lse = poisoned_buffer<float>(size_t(dev.in.tokens) * dev.in.heads);
    cuda::attention_forward(dev.shape, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(), nullptr, t);
    PG_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> out = from_device_bf16(o), l = lse.download();
    out.insert(out.end(), l.begin(), l.end());
    return out;
  };
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  AttentionTuning automatic, ws, wgmma;
  ws.forward_ws_min_waves = 0;
  wgmma.forward_kernel = cuda::AttentionForwardKernel::wgmma;
  wgmma.forward_warps = 8;
  wgmma.forward_key_tile = 64;
  ASSERT_EQ(automatic.forward_kernel, cuda::AttentionForwardKernel::wgmma_ws);
  // One row of 1024 tokens, 8 heads: (1 + 1024 / 192) x 4 = 24 blocks, under any H100's 2 x 132.
  const AttentionInputs small = make_inputs(cu_from_lengths({1024}), 8, 4, 110);
  DeviceAttention small_dev(small);
  const std::vector<float> small_auto = forward(small_dev, automatic), small_wgmma = forward(small_dev, wgmma);
  EXPECT_TRUE(same_bits(small_auto, small_wgmma)) << "small shape: not the wgmma forward's bits";
  EXPECT_FALSE(same_bits(small_auto, forward(small_dev, ws))) << "the two kernels agree bit for bit: a vacuous test";
  // 24 rows of 2048: (24 + 256) x 4 = 1120 blocks, over 2 waves of any GPU with up to 560 multiprocessors.
  std::vector<int> rows(24, 2048);
  const AttentionInputs large = make_inputs(cu_from_lengths(rows), 8, 4, 111);
  DeviceAttention large_dev(large);
  EXPECT_TRUE(same_bits(forward(large_dev, automatic), forward(large_dev, ws)))
      << "large shape: not the warp-specialized forward's bits";
}

// XSA's backward writes the attention backward's D (attention_backward_delta) from the dO it writes and
// the attention output it reads: the same bits as the backward's own first pass, so the backward that
// reads it (delta_ready) gives the bits of the one that computes it: dq, dk and dv deterministic, dk and
// dv of the warp-specialized backward, and the D rows themselves. Varlen, GQA (8 heads over 4).
TEST_F(AttentionTest, XsaWritesTheBackwardsDelta) {
  const AttentionInputs in = make_inputs(cu_from_lengths({300, 1, 200, 523}), 8, 4, 97);
  DeviceAttention dev(in);
  Rng rng(98);
  const auto dy = random_bf16_values(in.d_o.size(), rng), xv = random_bf16_values(in.v.size(), rng);
  auto d_dy = to_device_bf16(dy), d_xv = to_device_bf16(xv);
  auto o = poisoned_buffer<__nv_bfloat16>(in.q.size());
  auto lse = poisoned_buffer<float>(size_t(in.tokens) * in.heads);
  cuda::attention_forward(dev.shape, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(), nullptr, {});
  const size_t ws_bytes = cuda::attention_backward_workspace_bytes(dev.shape);
  const AttentionTuning deterministic{4, 8, true, cuda::AttentionForwardKernel::mma_sync,
                                      cuda::AttentionBackwardKernel::mma_sync};
  const AttentionTuning warp_specialized;  // the defaults
  for (const AttentionTuning& tuning : {deterministic, warp_specialized}) {
    SCOPED_TRACE(tuning_label(tuning));
    auto run = [&](bool from_xsa) {
      auto ws = poisoned_buffer<unsigned char>(ws_bytes);
      auto d_o = poisoned_buffer<__nv_bfloat16>(in.q.size());
      auto dxv = poisoned_buffer<float>(in.v.size());
      auto dq = poisoned_buffer<__nv_bfloat16>(in.q.size());
      auto dk = poisoned_buffer<__nv_bfloat16>(in.k.size());
      auto dv = poisoned_buffer<__nv_bfloat16>(in.v.size());
      float* delta = cuda::attention_backward_delta(dev.shape, ws.data());
      cuda::xsa_backward(d_dy.data(), o.data(), d_xv.data(), d_o.data(), dxv.data(), in.tokens, in.heads,
                         in.kv_heads, kDh, nullptr, from_xsa ? delta : nullptr);
      cuda::attention_backward(dev.shape, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(),
                               d_o.data(), dq.data(), dk.data(), dv.data(), ws.data(), ws_bytes, nullptr, tuning,
                               from_xsa);
      PG_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<float> d(static_cast<size_t>(in.tokens) * in.heads);
      PG_CUDA_CHECK(cudaMemcpy(d.data(), delta, d.size() * sizeof(float), cudaMemcpyDeviceToHost));
      return std::vector<std::vector<float>>{d, from_device_bf16(dk), from_device_bf16(dv), from_device_bf16(dq)};
    };
    const auto from_xsa = run(true), own = run(false);
    const char* names[] = {"D", "dk", "dv", "dq"};
    const size_t compared = tuning.deterministic ? 4 : 3;  // dq's atomics are not deterministic
    for (size_t i = 0; i < compared; ++i)
      EXPECT_EQ(0, std::memcmp(from_xsa[i].data(), own[i].data(), own[i].size() * sizeof(float))) << names[i];
    double norm = 0;
    for (float x : own[0]) norm += std::fabs(x);
    EXPECT_GT(norm, 0.0) << "D is all zero";
  }
  auto out = poisoned_buffer<__nv_bfloat16>(in.q.size());
  auto dxv = poisoned_buffer<float>(in.v.size());
  EXPECT_THROW(cuda::xsa_backward(d_dy.data(), o.data(), d_xv.data(), out.data(), dxv.data(), in.tokens, in.heads * 2,
                                  in.kv_heads, kDh / 2, nullptr, dxv.data()),
               Error);
}

TEST_F(AttentionTest, SmallWorkspaceAndBadHeadsAreErrors) {
  AttentionInputs in = make_inputs(cu_from_lengths({64}), 8, 4, 108);
  DeviceAttention dev(in);
  DeviceBuffer<__nv_bfloat16> o(in.q.size()), dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  DeviceBuffer<float> lse(size_t(in.tokens) * in.heads);
  const size_t ws_bytes = cuda::attention_backward_workspace_bytes(dev.shape);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  EXPECT_THROW(cuda::attention_backward(dev.shape, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(),
                                        dev.d_o.data(), dq.data(), dk.data(), dv.data(), ws.data(), ws_bytes - 4,
                                        nullptr),
               Error);
  AttentionShape bad = dev.shape;
  bad.num_kv_heads = 3;
  EXPECT_THROW(cuda::attention_forward(bad, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(), nullptr),
               Error);
  EXPECT_THROW(cuda::attention_forward(dev.shape, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(),
                                       nullptr, AttentionTuning{6, 8}),
               Error);
  AttentionTuning odd_key_tile;
  odd_key_tile.forward_key_tile = 96;
  EXPECT_THROW(cuda::attention_forward(dev.shape, dev.q.data(), dev.k.data(), dev.v.data(), o.data(), lse.data(),
                                       nullptr, odd_key_tile),
               Error);
}

}  // namespace
}  // namespace pgolf::test
