// bench_cuda: times the GPU kernels of a training step on the current device, in TFLOP/s — the
// cuBLASLt products of the linear layers (forward, input gradient, fp32 weight gradient) at
// M = tokens per step, flash attention forward and backward (dense rows and variable-length
// documents; on Hopper also the wgmma forward), the MLP's first product and its gradient with the
// activation (cuBLASLt + the separate pass against the fused Hopper kernels), the soft-capped
// cross-entropy (loss, backward, both in one pass), and the optimizer step
// of the s691 and s1560 layouts with its parts. CUDA events around each call; warm-up, then the
// median of the repeats.
//
//   bench_cuda [--tokens N] [--seq T] [--reps R] [--only gemm|attention|mlp|qkv|ce|optim] [--mlp-splits K]
//   (defaults: 98304 tokens, T 2048, 20 repeats, every section; --mlp-splits also times the fused MLP
//   kernels with their hidden tiles cut into K runs, beside the count they choose)
//   bench_cuda --model PRESET [--tokens N] [--seq T] [--reps R] [--profile]   (bench_model.h)
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/core.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "backend/cuda/activation.h"
#include "backend/cuda/arena.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/device.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/mlp_gemm.h"
#include "backend/cuda/qk_norm_rope.h"
#include "backend/cuda/softcap_ce.h"
#include "bench_model.h"
#include "core/error.h"
#include "core/half.h"
#include "core/rng.h"
#include "bench_util.h"

namespace pgolf::cuda {
namespace {

struct Options {
  int tokens = 98304;
  int seq = 2048;
  int reps = 20;
  std::string only;  // one section, or every section when empty
  std::string model;  // a preset: time GpuModel's forward + backward instead of the kernels
  bool profile = false;
  int mlp_splits = 0;  // a cut of the fused MLP kernels' hidden tiles to time too (0: none)
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> int {
      PG_CHECK(i + 1 < argc, "bench_cuda: {} needs a value", a);
      return std::atoi(argv[++i]);
    };
    if (a == "--tokens") o.tokens = value();
    else if (a == "--seq") o.seq = value();
    else if (a == "--reps") o.reps = value();
    else if (a == "--only" && i + 1 < argc) o.only = argv[++i];
    else if (a == "--model" && i + 1 < argc) o.model = argv[++i];
    else if (a == "--profile") o.profile = true;
    else if (a == "--mlp-splits") o.mlp_splits = value();
    else fail("bench_cuda: unknown argument '{}' (expected --tokens N, --seq T, --reps R, --only SECTION, --model PRESET, --profile, --mlp-splits K)", a);
  }
  PG_CHECK(o.tokens > 0 && o.seq > 0 && o.tokens % o.seq == 0 && o.reps > 0,
           "bench_cuda: --tokens must be a positive multiple of --seq, --reps positive");
  PG_CHECK(o.only.empty() || o.only == "gemm" || o.only == "attention" || o.only == "mlp" || o.only == "qkv" || o.only == "ce" ||
               o.only == "optim",
           "bench_cuda: --only takes gemm, attention, mlp, qkv, ce or optim, got '{}'", o.only);
  return o;
}

// Uniform values in [-1, 1) rounded to bf16 (random data: zeros would run faster than real data).
DeviceBuffer<__nv_bfloat16> random_bf16(size_t count, uint64_t seed) {
  Rng rng(seed);
  std::vector<__nv_bfloat16> host(count);
  for (auto& x : host) {
    __nv_bfloat16_raw raw;
    raw.x = f32_to_bf16_bits(static_cast<float>(rng.uniform(-1.0, 1.0)));
    x = raw;
  }
  return DeviceBuffer<__nv_bfloat16>(host, "benchmark input");
}

void bench_gemms(const Options& o, const Timer& timer) {
  GemmRunner runner;
  const int m = o.tokens;
  {  // the library's ceiling on a large square product
    const int n = 8192;
    auto a = random_bf16(size_t(n) * n, 1), b = random_bf16(size_t(n) * n, 2);
    DeviceBuffer<__nv_bfloat16> d(size_t(n) * n);
    GemmShape s;
    s.m = s.n = s.k = n, s.trans_b = true;
    double ms = timer.median_ms([&] { runner.run(s, a.data(), b.data(), d.data(), 1.f, 0.f, timer.stream); });
    row("gemm ceiling (x·Wᵀ, bf16)", "8192x8192x8192", ms, 2.0 * n * n * double(n));
  }
  const int max_features = 1536;
  auto x = random_bf16(size_t(m) * max_features, 3), dy = random_bf16(size_t(m) * max_features, 4);
  auto w = random_bf16(size_t(max_features) * max_features, 5);
  DeviceBuffer<__nv_bfloat16> y(size_t(m) * max_features);
  DeviceBuffer<float> dw(size_t(max_features) * max_features);
  dw.fill_bytes(0);
  const int layers[][2] = {{512, 512}, {512, 256}, {512, 1536}, {1536, 512}};  // {in, out}
  for (const auto& layer : layers) {
    const int in = layer[0], out = layer[1];
    const double flops = 2.0 * m * in * double(out);
    const std::string shape = fmt::format("M={} in={} out={}", m, in, out);
    row("linear forward  y = x·Wᵀ", shape,
        timer.median_ms([&] { linear_forward(runner, x.data(), w.data(), y.data(), m, in, out, timer.stream); }),
        flops);
    row("linear dX = dY·W", shape,
        timer.median_ms(
            [&] { linear_backward_input(runner, dy.data(), w.data(), y.data(), m, in, out, timer.stream); }),
        flops);
    row("linear dW += dYᵀ·X (fp32)", shape,
        timer.median_ms([&] {
          linear_backward_weight(runner, dy.data(), x.data(), dw.data(), m, in, out, 1.f, timer.stream);
        }),
        flops);
  }
}

// The MLP's first product with its activation at M = tokens, d = 512, for the hidden sizes of the
// presets (baseline 1024, s691 1536, s1560 2048): cuBLASLt, the separate pass, and (on Hopper) the
// fused kernel that does both.
void bench_mlp(const Options& o, const Timer& timer) {
  GemmRunner runner;
  const int m = o.tokens, d = 512;
  const float slope = 0.5f;
  for (const int hid : {1024, 1536, 2048}) {
    const size_t wide = size_t(m) * hid;
    auto x = random_bf16(size_t(m) * d, 11), w = random_bf16(size_t(hid) * d, 12), pre = random_bf16(wide, 13);
    DeviceBuffer<__nv_bfloat16> out(wide), post(wide);
    const double flops = 2.0 * m * d * double(hid);
    const std::string shape = fmt::format("M={} d={} hid={}", m, d, hid);
    const double up = timer.median_ms([&] { linear_forward(runner, x.data(), w.data(), out.data(), m, d, hid, timer.stream); });
    const double act = timer.median_ms(
        [&] { leaky_relu_sq_forward(pre.data(), post.data(), static_cast<int64_t>(wide), slope, timer.stream); });
    row("mlp up: cuBLAS x·Wfcᵀ", shape, up, flops);
    row("mlp up: activation pass", shape, act, 0);
    row("mlp up: cuBLAS + pass", shape, up + act, flops);
    const double down = timer.median_ms(
        [&] { linear_backward_input(runner, x.data(), w.data(), out.data(), m, hid, d, timer.stream); });
    const double grad = timer.median_ms([&] {
      leaky_relu_sq_backward(out.data(), pre.data(), post.data(), static_cast<int64_t>(wide), slope, timer.stream);
    });
    row("mlp dpre: cuBLAS dF·Wproj", shape, down, flops);
    row("mlp dpre: activation pass", shape, grad, 0);
    row("mlp dpre: cuBLAS + pass", shape, down + grad, flops);
    if (!mlp_fused_supported(d, hid)) continue;
    for (const auto& [schedule, name] : {std::pair{MlpSchedule::streamed_operands, "streamed A+B"},
                                        std::pair{MlpSchedule::resident_a, "resident A"}}) {
      // The chosen cut of the hidden tiles into runs of their own CTAs, and (where it chooses more than
      // one run) all tiles in one run, as the kernel did before the cut.
      const int chosen = mlp_fused_hidden_splits(m, hid, device_info(0).sm_count);
      std::vector<int> counts{chosen};
      if (chosen > 1) counts.push_back(1);
      if (o.mlp_splits > 0 && o.mlp_splits <= hid / 128 && o.mlp_splits != chosen && o.mlp_splits != 1)
        counts.push_back(o.mlp_splits);
      for (const int splits : counts) {
        const std::string label = fmt::format("{}, {} run{} of tiles", name, splits, splits > 1 ? "s" : "");
        row(fmt::format("mlp up: fused (wgmma, {})", label), shape, timer.median_ms([&] {
          mlp_fused_forward(x.data(), w.data(), out.data(), post.data(), m, d, hid, slope, timer.stream, schedule, splits);
        }), flops);
        row(fmt::format("mlp dpre: fused (wgmma, {})", label), shape, timer.median_ms([&] {
          mlp_fused_backward(x.data(), w.data(), pre.data(), out.data(), m, d, hid, slope, timer.stream, schedule,
                             splits);
        }), flops);
      }
    }
  }
}

// The attention's input product at s691's shape (8 q heads, 4 kv heads of 64, RoPE on 16, T = --seq):
// cuBLASLt with the separate QK-norm + RoPE pass, against the fused kernel with that pass in its
// epilogue, writing qkv's q and k columns (training) or not (an evaluation forward).
void bench_qkv(const Options& o, const Timer& timer) {
  const int64_t m = o.tokens;
  const int d = 512;
  const QkShape s{m, o.seq, 8, 4, 64, 16};
  const int cols = (s.heads + 2 * s.kv_heads) * 64;
  auto x = random_bf16(size_t(m) * d, 31), w = random_bf16(size_t(cols) * d, 32);
  DeviceBuffer<__nv_bfloat16> qkv(size_t(m) * cols), q(size_t(m) * s.heads * 64), k(size_t(m) * s.kv_heads * 64);
  DeviceBuffer<float> q_rstd(size_t(m) * s.heads), k_rstd(size_t(m) * s.kv_heads), gain(std::vector<float>(8, 1.f));
  DeviceBuffer<float> table(std::vector<float>(size_t(o.seq) * 8, 0.5f));
  const double flops = 2.0 * m * d * double(cols);
  const std::string shape = fmt::format("M={} d={} qkv={}", m, d, cols);
  GemmRunner runner;
  const double product =
      timer.median_ms([&] { linear_forward(runner, x.data(), w.data(), qkv.data(), m, d, cols, timer.stream); });
  const double pass = timer.median_ms([&] {
    qk_norm_rope_forward(qkv.data(), qkv.data() + 512, cols, gain.data(), table.data(), table.data(), q.data(), k.data(),
                         q_rstd.data(), k_rstd.data(), s, timer.stream);
  });
  row("qkv: cuBLAS n·Wqkvᵀ", shape, product, flops);
  row("qkv: QK-norm + RoPE pass", shape, pass, 0);
  row("qkv: cuBLAS + pass", shape, product + pass, flops);
  if (!qkv_fused_supported(d, s)) return;
  for (const bool lin : {true, false})
    row(fmt::format("qkv: fused (wgmma){}", lin ? "" : ", no q/k columns"), shape, timer.median_ms([&] {
          qkv_fused_forward(x.data(), w.data(), qkv.data(), lin, gain.data(), table.data(), table.data(), q.data(),
                            k.data(), q_rstd.data(), k_rstd.data(), s, d, timer.stream);
        }), flops);
}

// The soft-capped cross-entropy over the head's logits (cap 30): the loss pass, the separate backward,
// and the loss pass that writes dz too (softcap_ce_forward with a CeGradient). The shape column gives
// the DRAM bytes each must move as GB/s at the measured time.
void bench_ce(const Options& o, const Timer& timer) {
  const int64_t m = o.tokens;
  const float cap = 30.f;
  for (const int vocab : {1024, 8192}) {
    const size_t n = size_t(m) * vocab;
    auto z = random_bf16(n, 21);
    DeviceBuffer<__nv_bfloat16> dz(n);
    std::vector<int32_t> t(static_cast<size_t>(m));
    Rng rng(22);
    for (int32_t& x : t) x = static_cast<int32_t>(rng.below(uint64_t(vocab)));
    DeviceBuffer<int32_t> targets(t);
    DeviceBuffer<float> losses(static_cast<size_t>(m)), lse(static_cast<size_t>(m));
    const double bytes = 2.0 * double(n);  // one bf16 [M, V] read or write
    const auto print = [&](const char* name, double ms, double moved) {
      row(fmt::format("softcap CE {}", name), fmt::format("M={} V={} {:.0f} GB/s", m, vocab, moved / (ms * 1e6)), ms, 0);
    };
    print("loss", timer.median_ms([&] {
      softcap_ce_forward(z.data(), targets.data(), losses.data(), lse.data(), m, vocab, cap, timer.stream);
    }), bytes);
    print("backward", timer.median_ms([&] {
      softcap_ce_backward(z.data(), lse.data(), targets.data(), nullptr, 1.f / m, dz.data(), m, vocab, cap, timer.stream);
    }), 2 * bytes);
    const CeGradient grad{dz.data(), nullptr, 1.f / m};
    print("loss + dz", timer.median_ms([&] {
      softcap_ce_forward(z.data(), targets.data(), losses.data(), lse.data(), m, vocab, cap, timer.stream, &grad);
    }), 2 * bytes);
  }
}

// Causal attention FLOPs of one pass: 4 · Σ_segments L²/2 · H · 64 (two products of L²/2 · 64 each).
double attention_pass_flops(const std::vector<int32_t>& cu, int heads) {
  double pairs = 0;
  for (size_t i = 0; i + 1 < cu.size(); ++i) pairs += 0.5 * double(cu[i + 1] - cu[i]) * double(cu[i + 1] - cu[i]);
  return 4.0 * pairs * heads * kAttentionHeadDim;
}

// hopper: the device runs the wgmma kernels (sm_90).
void bench_attention(const std::string& label, const std::vector<int32_t>& cu_host, bool hopper, const Timer& timer) {
  const int n = cu_host.back(), heads = 8, kv_heads = 4;
  DeviceBuffer<int32_t> cu(cu_host);
  AttentionShape shape;
  shape.total_tokens = n, shape.num_heads = heads, shape.num_kv_heads = kv_heads;
  shape.cu_seqlens = cu.data(), shape.num_segments = static_cast<int>(cu_host.size()) - 1;
  auto q = random_bf16(size_t(n) * heads * 64, 11), k = random_bf16(size_t(n) * kv_heads * 64, 12);
  auto v = random_bf16(size_t(n) * kv_heads * 64, 13), d_o = random_bf16(size_t(n) * heads * 64, 14);
  DeviceBuffer<__nv_bfloat16> o(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  DeviceBuffer<float> lse(size_t(n) * heads);
  const size_t ws_bytes = attention_backward_workspace_bytes(shape);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  const double fwd_flops = attention_pass_flops(cu_host, heads);
  const std::string shape_text = fmt::format("N={} H=8 Hkv=4 segs={}", n, shape.num_segments);

  auto forward = [&](const AttentionTuning& t) {
    attention_forward(shape, q.data(), k.data(), v.data(), o.data(), lse.data(), timer.stream, t);
  };
  auto backward = [&](const AttentionTuning& t) {
    attention_backward(shape, q.data(), k.data(), v.data(), o.data(), lse.data(), d_o.data(), dq.data(), dk.data(),
                       dv.data(), ws.data(), ws_bytes, timer.stream, t);
  };
  for (int warps : {4, 8}) {
    const AttentionTuning t{warps, warps, false, AttentionForwardKernel::mma_sync, AttentionBackwardKernel::mma_sync};
    row(fmt::format("attn {} fwd mma.sync ({} warps)", label, warps), shape_text, timer.median_ms([&] { forward(t); }),
        fwd_flops);
    forward(t);  // the backward reads this tuning's O and LSE
    row(fmt::format("attn {} bwd mma.sync ({} warps)", label, warps), shape_text, timer.median_ms([&] { backward(t); }),
        2.5 * fwd_flops);
  }
  if (hopper) {  // the wgmma forward (both block shapes and key tiles) and backward (both block shapes)
    for (int warps : {4, 8}) {
      for (int key_tile : {64, 128}) {
        AttentionTuning t{warps, warps};
        t.forward_kernel = AttentionForwardKernel::wgmma;
        t.forward_key_tile = key_tile;
        row(fmt::format("attn {} fwd wgmma ({} warps, {} keys)", label, warps, key_tile), shape_text,
            timer.median_ms([&] { forward(t); }), fwd_flops);
      }
    }
    for (int key_tile : {64, 128}) {
      AttentionTuning t;  // warp-specialized: 12 consumer warps and a producer warpgroup
      t.forward_warps = 12;
      t.forward_kernel = AttentionForwardKernel::wgmma_ws;
      t.forward_key_tile = key_tile;
      row(fmt::format("attn {} fwd wgmma-ws (12 warps, {} keys)", label, key_tile), shape_text,
          timer.median_ms([&] { forward(t); }), fwd_flops);
    }
    forward(AttentionTuning{});
    for (int warps : {4, 8, 12}) {
      AttentionTuning t{warps, warps};
      t.backward_kernel = AttentionBackwardKernel::wgmma;
      row(fmt::format("attn {} bwd wgmma ({} warps)", label, warps), shape_text, timer.median_ms([&] { backward(t); }),
          2.5 * fwd_flops);
    }
    AttentionTuning ws;  // warp-specialized: 12 consumer warps and a producer warpgroup
    ws.backward_kernel = AttentionBackwardKernel::wgmma_ws;
    row(fmt::format("attn {} bwd wgmma-ws (12 warps)", label), shape_text, timer.median_ms([&] { backward(ws); }),
        2.5 * fwd_flops);
  }
  const AttentionTuning defaults{};
  row(fmt::format("attn {} fwd+bwd (w{}/w{})", label, defaults.forward_warps, defaults.backward_warps), shape_text,
      timer.median_ms([&] {
        forward(defaults);
        backward(defaults);
      }),
      3.5 * fwd_flops);
}

int run(int argc, char** argv) {
  const Options o = parse(argc, argv);
  PG_CHECK(device_count() > 0, "bench_cuda: no CUDA device");
  if (!o.model.empty()) {
    bench_model(ModelBenchOptions{o.model, o.tokens, o.seq, o.reps, o.profile});
    return 0;
  }
  const DeviceInfo dev = device_info(0);
  fmt::print("device: {} ({} SMs, {:.1f} GiB, L2 {:.0f} MiB)\n", dev.name, dev.sm_count,
             dev.total_memory / 1073741824.0, dev.l2_bytes / 1048576.0);
  cudaStream_t stream;
  PG_CUDA_CHECK(cudaStreamCreate(&stream));
  const Timer timer{stream, o.reps};
  fmt::print("{:<34} {:<34} {:>9} {:>9}\n", "kernel", "shape", "ms", "TFLOP/s");
  auto section = [&](const char* name) { return o.only.empty() || o.only == name; };
  if (section("gemm")) bench_gemms(o, timer);

  if (section("attention")) {
    std::vector<int32_t> dense;
    for (int t = 0; t <= o.tokens; t += o.seq) dense.push_back(t);
    const bool hopper = dev.cc_major == 9 && dev.cc_minor == 0;
    bench_attention(fmt::format("dense T={}", o.seq), dense, hopper, timer);

    // Documents of uniformly random length 1..T packed into the same number of tokens.
    Rng rng(7);
    std::vector<int32_t> docs{0};
    while (docs.back() < o.tokens)
      docs.push_back(std::min(o.tokens, docs.back() + 1 + static_cast<int>(rng.below(uint64_t(o.seq)))));
    bench_attention("varlen 1..T", docs, hopper, timer);
  }
  if (section("mlp")) bench_mlp(o, timer);
  if (section("qkv")) bench_qkv(o, timer);
  if (section("ce")) bench_ce(o, timer);
  if (section("optim")) bench_optimizer(timer);
  PG_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace pgolf::cuda

int main(int argc, char** argv) {
  try {
    return pgolf::cuda::run(argc, argv);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_cuda: error: {}\n", e.what());
    return 1;
  }
}
