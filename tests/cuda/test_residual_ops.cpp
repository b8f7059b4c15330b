// The residual-stream ops (rmsnorm.h, residual.h, smear.h) against their CPU twins (cpu/rmsnorm.h,
// cpu/mixing.h, cpu/smear.h), forward and backward, with the tolerance rule of op_test_util.h. Shapes:
// an odd row count with narrow rows, more rows than one grid pass covers (grid-stride loops), and rows
// wider than 512 features (the 4-vectors-per-lane kernels).
#include <gtest/gtest.h>

#include <cstring>

#include "backend/cpu/mixing.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/cpu/smear.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/residual.h"
#include "backend/cuda/rmsnorm.h"
#include "backend/cuda/smear.h"
#include "core/error.h"
#include "op_test_util.h"

namespace pgolf::test {
namespace {

using cuda::DeviceBuffer;
using bf16 = __nv_bfloat16;

struct RowCase {
  int64_t rows;
  int dim;
};
const RowCase kCases[] = {{111, 64}, {4500, 256}, {53, 768}};

std::string case_name(const RowCase& c) { return std::to_string(c.rows) + "x" + std::to_string(c.dim); }

class ResidualOpsTest : public CudaTest {};

// Puts the process-wide row staging switch (residual.h) back as it was when the test changed it.
struct RowStagingRestore {
  bool was = cuda::row_staging();
  ~RowStagingRestore() { cuda::set_row_staging(was); }
};

TEST_F(ResidualOpsTest, RmsNormForwardBackwardAndLaneMean) {
  for (const RowCase& c : kCases) {
    for (const bool mean : {false, true}) {
      const std::string tag = case_name(c) + (mean ? "_mean" : "");
      SCOPED_TRACE(tag);
      const int64_t n = c.rows * c.dim;
      Rng rng(100 + c.dim + mean);
      const auto x = random_bf16_values(n, rng), x2 = random_bf16_values(n, rng);
      const auto dy = random_f32_values(n, rng), dx0 = random_f32_values(n, rng);
      const float scale = 0.7f, out_scale = mean ? 0.5f : 1.f;
      std::vector<float> u(n);
      for (int64_t i = 0; i < n; ++i) u[i] = mean ? 0.5f * (x[i] + x2[i]) : x[i];
      std::vector<double> ud(n);
      for (int64_t i = 0; i < n; ++i) ud[i] = mean ? 0.5 * (double{x[i]} + x2[i]) : double{x[i]};

      std::vector<double> y_ref(n), rstd_ref(c.rows);
      cpu::rmsnorm_forward<double>(ud.data(), y_ref.data(), rstd_ref.data(), c.rows, c.dim, scale);
      std::vector<float> y_naive(n), rstd_naive(c.rows);
      cpu::rmsnorm_forward<float>(u.data(), y_naive.data(), rstd_naive.data(), c.rows, c.dim, scale);
      y_naive = rounded_bf16(y_naive);

      auto dx_ = to_device_bf16(x), dx2_ = to_device_bf16(x2);
      auto y = poisoned_buffer<bf16>(n);
      auto rstd = poisoned_buffer<float>(c.rows);
      cuda::rmsnorm_forward(dx_.data(), mean ? dx2_.data() : nullptr, y.data(), rstd.data(), c.rows, c.dim, scale,
                            nullptr);
      sync_device();
      expect_within_naive(tag + "_y", from_device_bf16(y), y_naive, y_ref, kBf16Bound);
      expect_within_naive(tag + "_rstd", rstd.download(), rstd_naive, rstd_ref, kBf16Bound);

      // Backward from the fp32 rstd both sides share; accumulating into dx0 when averaging lanes.
      std::vector<double> dx_ref(n, 0.0);
      cpu::rmsnorm_backward<double>(to_double(dy).data(), ud.data(), to_double(rstd_naive).data(), dx_ref.data(),
                                    c.rows, c.dim, scale);
      std::vector<float> dx_naive(n, 0.f);
      cpu::rmsnorm_backward<float>(dy.data(), u.data(), rstd_naive.data(), dx_naive.data(), c.rows, c.dim, scale);
      for (int64_t i = 0; i < n; ++i) {
        dx_ref[i] = (mean ? dx0[i] : 0.0) + out_scale * dx_ref[i];
        dx_naive[i] = (mean ? dx0[i] : 0.f) + out_scale * dx_naive[i];
      }
      DeviceBuffer<float> ddy(dy), drstd(rstd_naive), ddx(mean ? dx0 : std::vector<float>(n, NAN));
      cuda::rmsnorm_backward(ddy.data(), dx_.data(), mean ? dx2_.data() : nullptr, drstd.data(), ddx.data(), c.rows,
                             c.dim, scale, out_scale, mean, nullptr);
      sync_device();
      expect_within_naive(tag + "_dx", ddx.download(), dx_naive, dx_ref, kF32Bound);
    }
  }
}

TEST_F(ResidualOpsTest, MixNormMatchesResidMixThenRmsNorm) {
  for (const RowCase& c : kCases) {
    const std::string tag = case_name(c);
    SCOPED_TRACE(tag);
    const int64_t n = c.rows * c.dim;
    Rng rng(200 + c.dim);
    const auto x = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng);
    auto mix = params_near(2 * c.dim, rng, 0.5, 0.5);
    const float scale = 0.6f;
    TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));

    std::vector<double> xin_ref(n), n_ref(n), rstd_ref(c.rows);
    cpu::resid_mix_forward<double>(to_double(x).data(), to_double(x0).data(), to_double(mix).data(), xin_ref.data(),
                                   c.rows, c.dim);
    cpu::rmsnorm_forward<double>(xin_ref.data(), n_ref.data(), rstd_ref.data(), c.rows, c.dim, scale);
    std::vector<float> xin_naive(n), n_naive(n), rstd_naive(c.rows);
    cpu::resid_mix_forward<float>(x.data(), x0.data(), mix.data(), xin_naive.data(), c.rows, c.dim);
    xin_naive = rounded_bf16(xin_naive);
    cpu::rmsnorm_forward<float>(xin_naive.data(), n_naive.data(), rstd_naive.data(), c.rows, c.dim, scale);

    auto dx = to_device_bf16(x), dx0 = to_device_bf16(x0);
    DeviceBuffer<float> dmix(mix);
    auto xin = poisoned_buffer<bf16>(n), nrm = poisoned_buffer<bf16>(n);
    auto rstd = poisoned_buffer<float>(c.rows);
    cuda::mix_norm_forward(dx.data(), dx0.data(), dmix.data(), xin.data(), nrm.data(), rstd.data(), c.rows, c.dim,
                           scale, nullptr);
    sync_device();
    expect_within_naive(tag + "_x_in", from_device_bf16(xin), xin_naive, xin_ref, kBf16Bound);
    expect_within_naive(tag + "_n", from_device_bf16(nrm), rounded_bf16(n_naive), n_ref, kBf16Bound);
    expect_within_naive(tag + "_rstd", rstd.download(), rstd_naive, rstd_ref, kBf16Bound);

    // Backward: rstd is given, x_in is recomputed from x and x0 on the GPU, so both sides use the x_in the
    // GPU forward stored; t = g + rms'(dn); dx = m0⊙t, dx0 += m1⊙t, dmix += sums.
    const auto xin_stored = from_device_bf16(xin);
    const auto dn = random_f32_values(n, rng), g = random_f32_values(n, rng);
    const auto dx0_init = random_f32_values(n, rng), dmix_init = random_f32_values(2 * c.dim, rng);
    auto run_cpu = [&](auto zero) {
      using T = decltype(zero);
      std::vector<T> t(g.begin(), g.end()), dxo(n, T(0)), dx0o(dx0_init.begin(), dx0_init.end());
      std::vector<T> dmixo(dmix_init.begin(), dmix_init.end());
      const std::vector<T> dnT(dn.begin(), dn.end()), xinT(xin_stored.begin(), xin_stored.end());
      const std::vector<T> rT(rstd_naive.begin(), rstd_naive.end()), xT(x.begin(), x.end()), x0T(x0.begin(), x0.end());
      const std::vector<T> mT(mix.begin(), mix.end());
      cpu::rmsnorm_backward<T>(dnT.data(), xinT.data(), rT.data(), t.data(), c.rows, c.dim, T(scale));
      cpu::resid_mix_backward<T>(t.data(), xT.data(), x0T.data(), mT.data(), dxo.data(), dx0o.data(), dmixo.data(),
                                 c.rows, c.dim);
      return std::make_tuple(dxo, dx0o, dmixo);
    };
    const auto [dx_ref, dx0_ref, dmix_ref] = run_cpu(0.0);
    const auto [dx_naive, dx0_naive, dmix_naive] = run_cpu(0.f);
    DeviceBuffer<float> ddn(dn), dg(g), drstd(rstd_naive), ddx0(dx0_init), ddmix(dmix_init);
    // g_in aliases dx (the sequential block's in-place use).
    cuda::mix_norm_backward(ddn.data(), dg.data(), drstd.data(), dx.data(), dx0.data(), dmix.data(), dg.data(), false,
                            ddx0.data(), ddmix.data(), c.rows, c.dim, scale, tw.ws, nullptr);
    sync_device();
    expect_within_naive(tag + "_dx", dg.download(), dx_naive, dx_ref, kF32Bound);
    expect_within_naive(tag + "_dx0", ddx0.download(), dx0_naive, dx0_ref, kF32Bound);
    expect_within_naive(tag + "_dmix", ddmix.download(), dmix_naive, dmix_ref, kF32Bound);
  }
}

TEST_F(ResidualOpsTest, BranchWithGateAndNormMatchesBranchAddThenRmsNorm) {
  for (const RowCase& c : kCases) {
    for (const bool gated : {true, false}) {
      const std::string tag = case_name(c) + (gated ? "_gated" : "");
      SCOPED_TRACE(tag);
      const int64_t n = c.rows * c.dim;
      Rng rng(300 + c.dim + gated);
      const auto x = random_bf16_values(n, rng), a = random_bf16_values(n, rng);
      const auto scale = params_near(c.dim, rng, 1.0, 0.3), gate = params_near(c.dim, rng, 0.0, 1.0);
      const float ln = 0.5f;
      TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
      const float* gate_h = gated ? gate.data() : nullptr;

      std::vector<double> out_ref(n), n_ref(n), rstd_ref(c.rows);
      const auto gate_d = to_double(gate);
      cpu::branch_add_forward<double>(to_double(x).data(), to_double(a).data(), to_double(scale).data(),
                                      gated ? gate_d.data() : nullptr, out_ref.data(), c.rows, c.dim);
      cpu::rmsnorm_forward<double>(out_ref.data(), n_ref.data(), rstd_ref.data(), c.rows, c.dim, ln);
      std::vector<float> out_naive(n), n_naive(n), rstd_naive(c.rows);
      cpu::branch_add_forward<float>(x.data(), a.data(), scale.data(), gate_h, out_naive.data(), c.rows, c.dim);
      out_naive = rounded_bf16(out_naive);
      cpu::rmsnorm_forward<float>(out_naive.data(), n_naive.data(), rstd_naive.data(), c.rows, c.dim, ln);

      auto dx = to_device_bf16(x), da = to_device_bf16(a);
      DeviceBuffer<float> dscale(scale), dgate(gate);
      auto out = poisoned_buffer<bf16>(n), nrm = poisoned_buffer<bf16>(n);
      auto rstd = poisoned_buffer<float>(c.rows);
      cuda::branch_forward(dx.data(), da.data(), dscale.data(), gated ? dgate.data() : nullptr, out.data(), nrm.data(),
                           rstd.data(), c.rows, c.dim, ln, nullptr);
      sync_device();
      expect_within_naive(tag + "_out", from_device_bf16(out), out_naive, out_ref, kBf16Bound);
      expect_within_naive(tag + "_n", from_device_bf16(nrm), rounded_bf16(n_naive), n_ref, kBf16Bound);

      // Backward with the norm: g += rms'(dn, out); da = scale⊙σ⊙g; dscale, dgate += sums.
      const auto dn = random_f32_values(n, rng), g = random_f32_values(n, rng);
      const auto ds_init = random_f32_values(c.dim, rng), dg_init = random_f32_values(c.dim, rng);
      auto run_cpu = [&](auto zero) {
        using T = decltype(zero);
        std::vector<T> t(g.begin(), g.end()), dao(n, T(0)), dso(ds_init.begin(), ds_init.end());
        std::vector<T> dgo(dg_init.begin(), dg_init.end());
        const std::vector<T> dnT(dn.begin(), dn.end()), outT(out_naive.begin(), out_naive.end());
        const std::vector<T> rT(rstd_naive.begin(), rstd_naive.end()), aT(a.begin(), a.end());
        const std::vector<T> sT(scale.begin(), scale.end()), gT(gate.begin(), gate.end());
        cpu::rmsnorm_backward<T>(dnT.data(), outT.data(), rT.data(), t.data(), c.rows, c.dim, T(ln));
        cpu::branch_add_backward<T>(t.data(), aT.data(), sT.data(), gated ? gT.data() : nullptr, dao.data(), dso.data(),
                                    dgo.data(), c.rows, c.dim);
        return std::make_tuple(t, dao, dso, dgo);
      };
      const auto [g_ref, da_ref, ds_ref, dg_ref] = run_cpu(0.0);
      const auto [g_naive, da_naive, ds_naive, dg_naive] = run_cpu(0.f);
      DeviceBuffer<float> ddn(dn), dgr(g), drstd(rstd_naive), dds(ds_init), ddg(dg_init);
      auto dout = to_device_bf16(out_naive);
      auto dda = poisoned_buffer<bf16>(n);
      cuda::branch_backward(ddn.data(), dgr.data(), nullptr, dout.data(), drstd.data(), da.data(), dscale.data(),
                            gated ? dgate.data() : nullptr, dda.data(), dds.data(), ddg.data(), c.rows, c.dim, ln,
                            tw.ws, nullptr);
      sync_device();
      expect_within_naive(tag + "_g", dgr.download(), g_naive, g_ref, kF32Bound);
      expect_within_naive(tag + "_da", from_device_bf16(dda), rounded_bf16(da_naive), da_ref, kBf16Bound);
      expect_within_naive(tag + "_dscale", dds.download(), ds_naive, ds_ref, kF32Bound);
      if (gated) expect_within_naive(tag + "_dgate", ddg.download(), dg_naive, dg_ref, kF32Bound);
      else EXPECT_EQ(ddg.download(), dg_init) << "no gate: its gradient must stay untouched";

      // Without the norm (the MLP branch): g is unchanged, da and the parameter sums as above. With g_add
      // (an encoder output's skip gradient): g += g_add is stored and is the gradient da and the sums see.
      const auto g_add = random_f32_values(n, rng);
      for (const bool add : {false, true}) {
        const std::string what = tag + (add ? "_plain_g_add" : "_plain");
        std::vector<float> t_naive(g);
        std::vector<double> t_ref(g.begin(), g.end());
        if (add) {
          for (int64_t i = 0; i < n; ++i) {
            t_naive[i] += g_add[i];
            t_ref[i] += g_add[i];
          }
        }
        auto dda2 = poisoned_buffer<bf16>(n);
        DeviceBuffer<float> dg2(g), dg_add(g_add), dds2(ds_init);
        cuda::branch_backward(nullptr, dg2.data(), add ? dg_add.data() : nullptr, dout.data(), nullptr, da.data(),
                              dscale.data(), gated ? dgate.data() : nullptr, dda2.data(), dds2.data(), nullptr, c.rows,
                              c.dim, 1.f, tw.ws, nullptr);
        sync_device();
        // One fp32 add per element on both sides: the stored sum is exact to the naive bits.
        EXPECT_EQ(dg2.download(), t_naive) << what << ": g must be g (+ g_add), bit for bit";
        std::vector<double> da2_ref(n, 0.0), ds2_ref(ds_init.begin(), ds_init.end());
        std::vector<float> da2_naive(n, 0.f), ds2_naive(ds_init);
        cpu::branch_add_backward<double>(t_ref.data(), to_double(a).data(), to_double(scale).data(),
                                         gated ? gate_d.data() : nullptr, da2_ref.data(), ds2_ref.data(), nullptr,
                                         c.rows, c.dim);
        cpu::branch_add_backward<float>(t_naive.data(), a.data(), scale.data(), gate_h, da2_naive.data(),
                                        ds2_naive.data(), nullptr, c.rows, c.dim);
        expect_within_naive(what + "_da", from_device_bf16(dda2), rounded_bf16(da2_naive), da2_ref, kBf16Bound);
        expect_within_naive(what + "_dscale", dds2.download(), ds2_naive, ds2_ref, kF32Bound);
      }
    }
  }
}

// mix_norm_backward with the MLP-branch backward of the layer below folded in (BranchBelow) gives the bits of
// the two passes it replaces: mix_norm_backward, then branch_backward without a norm on the gradient it wrote
// (with and without a gate and a skip gradient g_add).
TEST_F(ResidualOpsTest, MixNormBackwardWithTheBranchBelowEqualsBothPasses) {
  for (const RowCase& c : kCases) {
    for (const bool gated : {false, true}) {
      for (const bool add : {false, true}) {
        const std::string tag = case_name(c) + (gated ? "_gated" : "") + (add ? "_g_add" : "");
        SCOPED_TRACE(tag);
        const int64_t n = c.rows * c.dim;
        Rng rng(600 + c.dim + 2 * gated + add);
        const auto dn = random_f32_values(n, rng), g = random_f32_values(n, rng), g_add = random_f32_values(n, rng);
        const auto x = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng), f = random_bf16_values(n, rng);
        const auto dx0_init = random_f32_values(n, rng), rstd = params_near(c.rows, rng, 1.0, 0.3);
        const auto mix = params_near(2 * c.dim, rng, 0.5, 0.5), scale = params_near(c.dim, rng, 1.0, 0.3);
        const auto gate = params_near(c.dim, rng, 0.0, 1.0), sums_init = random_f32_values(4 * c.dim, rng);
        TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
        DeviceBuffer<float> ddn(dn), dadd(g_add), drstd(rstd), dmix(mix), dscale(scale), dgate(gate);
        auto dx = to_device_bf16(x), dx0 = to_device_bf16(x0), df = to_device_bf16(f);

        auto run = [&](bool fused) {
          const std::vector<float> dmix_init(sums_init.begin(), sums_init.begin() + 2 * c.dim);
          const std::vector<float> ds_init(sums_init.begin() + 2 * c.dim, sums_init.begin() + 3 * c.dim);
          const std::vector<float> dg_init(sums_init.begin() + 3 * c.dim, sums_init.end());
          DeviceBuffer<float> out_g(g), out_dx0(dx0_init), out_dmix(dmix_init), out_ds(ds_init), out_dg(dg_init);
          auto out_da = poisoned_buffer<bf16>(n);
          const cuda::BranchBelow below{df.data(),     dscale.data(), gated ? dgate.data() : nullptr,
                                        add ? dadd.data() : nullptr,  out_da.data(),
                                        out_ds.data(), out_dg.data()};
          cuda::mix_norm_backward(ddn.data(), out_g.data(), drstd.data(), dx.data(), dx0.data(), dmix.data(),
                                  out_g.data(), false, out_dx0.data(), out_dmix.data(), c.rows, c.dim, 0.6f, tw.ws,
                                  nullptr, fused ? &below : nullptr);
          if (!fused)
            cuda::branch_backward(nullptr, out_g.data(), below.g_add, nullptr, nullptr, below.a, below.branch_scale,
                                  below.gate, below.da, below.dscale, below.dgate, c.rows, c.dim, 1.f, tw.ws, nullptr);
          sync_device();
          return std::vector<std::vector<float>>{out_g.download(), out_dx0.download(), out_dmix.download(),
                                                 from_device_bf16(out_da), out_ds.download(), out_dg.download()};
        };
        const auto fused = run(true), separate = run(false);
        const char* names[] = {"g", "dx0", "dmix", "da", "dscale", "dgate"};
        for (size_t i = 0; i < fused.size(); ++i) EXPECT_EQ(fused[i], separate[i]) << tag << ": " << names[i];
        const std::vector<float> dgate_init(sums_init.begin() + 3 * c.dim, sums_init.end());
        if (gated) EXPECT_NE(fused[5], dgate_init) << tag << ": the gate's gradient must be added";
        else EXPECT_EQ(fused[5], dgate_init) << tag << ": no gate: its gradient must stay untouched";
      }
    }
  }
}

// mix_norm_backward with the backward of the U-Net skip folded in (SkipBelow) gives the bits of
// mix_norm_backward followed by skip_backward: d x, ds, dw, dgate (and, with the branch below folded in
// too, its outputs), for a plain skip with and without the branch below, a gated one, and a gated one
// into a parallel layer's pass (accumulating dx, no g_in), with the row kernels' vectors staged and in
// registers.
TEST_F(ResidualOpsTest, MixNormBackwardWithTheSkipEqualsBothPasses) {
  const RowStagingRestore restore;
  struct Variant {
    const char* name;
    bool below, gated, lanes;
  };
  const Variant variants[] = {
      {"plain", false, false, false}, {"plain_below", true, false, false}, {"gated", false, true, false},
      {"gated_lanes", false, true, true}};
  for (const RowCase& c : kCases) {
    for (const Variant& var : variants) {
      for (const bool staged : {true, false}) {
        cuda::set_row_staging(staged);
        const std::string tag = case_name(c) + "_" + var.name + (staged ? "_staged" : "_registers");
        SCOPED_TRACE(tag);
        const int64_t n = c.rows * c.dim;
        Rng rng(900 + c.dim + 2 * var.below + 4 * var.gated + 8 * var.lanes);
        const auto dn = random_bf16_values(n, rng), g = random_f32_values(n, rng);
        const auto x = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng), f = random_bf16_values(n, rng);
        const auto skip_s = random_bf16_values(n, rng), skip_x = random_bf16_values(n, rng);
        const auto dx0_init = random_f32_values(n, rng);
        const auto rstd = params_near(c.rows, rng, 1.0, 0.3), mix = params_near(2 * c.dim, rng, 0.5, 0.5);
        const auto scale = params_near(c.dim, rng, 1.0, 0.3), gate = params_near(c.dim, rng, 0.0, 1.0);
        const auto w = params_near(c.dim, rng, 1.0, 0.5), skip_gate = params_near(c.dim, rng, 0.0, 1.0);
        const auto sums_init = random_f32_values(6 * c.dim, rng);
        TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
        DeviceBuffer<float> drstd(rstd), dmix(mix), dscale(scale), dgate(gate), dw(w), dskip_gate(skip_gate);
        auto ddn = to_device_bf16(dn), dx = to_device_bf16(x), dx0 = to_device_bf16(x0), df = to_device_bf16(f);
        auto ds = to_device_bf16(skip_s), dsx = to_device_bf16(skip_x);

        auto run = [&](bool fused) {
          auto part = [&](int from, int count) {
            return std::vector<float>(sums_init.begin() + from * c.dim, sums_init.begin() + (from + count) * c.dim);
          };
          DeviceBuffer<float> out_g(g), out_dx0(dx0_init), out_dmix(part(0, 2)), out_ds(part(2, 1)),
              out_dg(part(3, 1)), out_dw(part(4, 1)), out_dsg(part(5, 1)), out_skip_ds(std::vector<float>(n, NAN));
          auto out_da = poisoned_buffer<bf16>(n);
          const cuda::BranchBelow below{df.data(), dscale.data(), dgate.data(), nullptr, out_da.data(),
                                        out_ds.data(), out_dg.data()};
          cuda::SkipBelow skip{ds.data(), dw.data(), out_skip_ds.data(), out_dw.data()};
          if (var.gated) skip.gate = dskip_gate.data(), skip.x = dsx.data(), skip.dgate = out_dsg.data();
          cuda::mix_norm_backward(ddn.data(), var.lanes ? nullptr : out_g.data(), drstd.data(), dx.data(), dx0.data(),
                                  dmix.data(), out_g.data(), var.lanes, out_dx0.data(), out_dmix.data(), c.rows, c.dim,
                                  0.6f, tw.ws, nullptr, var.below ? &below : nullptr, fused ? &skip : nullptr);
          if (!fused)
            cuda::skip_backward(out_g.data(), skip.x, skip.s, skip.w, skip.gate, skip.ds, skip.dw, skip.dgate, c.rows,
                                c.dim, tw.ws, nullptr);
          sync_device();
          std::vector<std::vector<float>> r{out_g.download(),       out_dx0.download(), out_dmix.download(),
                                            out_skip_ds.download(), out_dw.download(),  out_dsg.download()};
          if (var.below) r.insert(r.end(), {from_device_bf16(out_da), out_ds.download(), out_dg.download()});
          return r;
        };
        const auto fused = run(true), separate = run(false);
        const char* names[] = {"g", "dx0", "dmix", "skip ds", "skip dw", "skip dgate", "da", "dscale", "dgate"};
        ASSERT_EQ(fused.size(), separate.size());
        for (size_t i = 0; i < fused.size(); ++i)
          EXPECT_EQ(0, std::memcmp(fused[i].data(), separate[i].data(), fused[i].size() * sizeof(float)))
              << tag << ": " << names[i];
        EXPECT_NE(fused[4], std::vector<float>(sums_init.begin() + 4 * c.dim, sums_init.begin() + 5 * c.dim))
            << tag << ": the skip weight's gradient must be added";
        const std::vector<float> gate_init(sums_init.begin() + 5 * c.dim, sums_init.end());
        if (var.gated) EXPECT_NE(fused[5], gate_init) << tag << ": the skip gate's gradient must be added";
        else EXPECT_EQ(fused[5], gate_init) << tag << ": no gate: its gradient must stay untouched";
      }
    }
  }
  // The branch below with a skip gradient into it, or with a gated skip, is refused with a folded skip before
  // any launch (the skip's gradient and the branch's would differ).
  auto both = [](bool g_add, bool gated) {
    const auto* some = reinterpret_cast<const float*>(uintptr_t{256});
    auto* out = reinterpret_cast<bf16*>(uintptr_t{256});
    const cuda::BranchBelow below{reinterpret_cast<const bf16*>(out), some, nullptr, g_add ? some : nullptr, out};
    cuda::SkipBelow skip{reinterpret_cast<const bf16*>(out), some, const_cast<float*>(some), nullptr};
    if (gated) skip.gate = some, skip.x = reinterpret_cast<const bf16*>(out);
    cuda::mix_norm_backward(some, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, false, nullptr, nullptr, 4, 64,
                            1.f, cuda::ReduceWorkspace{}, nullptr, &below, &skip);
  };
  EXPECT_THROW(both(true, false), pgolf::Error);
  EXPECT_THROW(both(false, true), pgolf::Error);
}

// mix_norm_forward with the residual updates below folded in (ResidualBelow: the MLP branch of the layer
// below, with or without its gate, then no skip, a skip or a gated skip) writes the bits of the separate
// passes (branch_forward, skip_forward, mix_norm_forward): out, in, x_in, n and rstd.
// Dx0Pass against the passes it replaces, bit for bit: `fresh` (dx0 not read) against a cleared dx0,
// `takes_dx` (d x added into dx0, not stored) against storing d x and add_f32(dx0, dx), both together, and
// a null dx0 (no x0 gradient) against the default for everything else. With and without a plain skip
// (takes_dx only without: layer 0 has no skip, and the pass refuses one), for a plain and a parallel layer
// (no g_in, d x accumulated), staged and not.
TEST_F(ResidualOpsTest, MixNormBackwardDx0PassesEqualTheSeparatePasses) {
  const RowStagingRestore restore;
  for (const RowCase& c : kCases) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool lanes = variant & 1, with_skip = variant & 2;
      for (const bool staged : {true, false}) {
        cuda::set_row_staging(staged);
        const std::string tag = case_name(c) + (lanes ? "_lanes" : "_plain") + (staged ? "_staged" : "_registers") +
                                (with_skip ? "_skip" : "");
        SCOPED_TRACE(tag);
        const int64_t n = c.rows * c.dim;
        Rng rng(1300 + c.dim + 2 * lanes);
        const auto dn = random_bf16_values(n, rng), g = random_f32_values(n, rng), dx0_init = random_f32_values(n, rng);
        const auto x = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng), skip_s = random_bf16_values(n, rng);
        const auto rstd = params_near(c.rows, rng, 1.0, 0.3), mix = params_near(2 * c.dim, rng, 0.5, 0.5);
        const auto w = params_near(c.dim, rng, 1.0, 0.5), sums_init = random_f32_values(3 * c.dim, rng);
        TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
        DeviceBuffer<float> drstd(rstd), dmix(mix), dw(w);
        auto ddn = to_device_bf16(dn), dx = to_device_bf16(x), dx0 = to_device_bf16(x0), ds = to_device_bf16(skip_s);
        const std::vector<float> zeros(n, 0.f), poison(n, NAN);

        struct Result {
          std::vector<float> g, dx0, dmix, skip_ds, skip_dw;
        };
        // dx0_start: dx0's contents before the pass (null: no dx0); add_after: add_f32(dx0, g) after it.
        auto run = [&](const std::vector<float>* dx0_start, cuda::Dx0Pass pass, bool add_after) {
          DeviceBuffer<float> out_g(g), out_dx0(dx0_start ? *dx0_start : zeros), out_skip_ds(poison),
              out_dmix(std::vector<float>(sums_init.begin(), sums_init.begin() + 2 * c.dim)),
              out_dw(std::vector<float>(sums_init.begin() + 2 * c.dim, sums_init.end()));
          const cuda::SkipBelow skip{ds.data(), dw.data(), out_skip_ds.data(), out_dw.data()};
          cuda::mix_norm_backward(ddn.data(), lanes ? nullptr : out_g.data(), drstd.data(), dx.data(), dx0.data(),
                                  dmix.data(), out_g.data(), lanes, dx0_start ? out_dx0.data() : nullptr,
                                  out_dmix.data(), c.rows, c.dim, 0.6f, tw.ws, nullptr, nullptr,
                                  with_skip ? &skip : nullptr, pass);
          if (add_after) cuda::add_f32(out_dx0.data(), out_g.data(), n, nullptr);
          sync_device();
          return Result{out_g.download(), out_dx0.download(), out_dmix.download(), out_skip_ds.download(),
                        out_dw.download()};
        };
        auto same = [&](const std::vector<float>& a, const std::vector<float>& b, const char* what) {
          ASSERT_EQ(a.size(), b.size()) << what;
          EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << tag << ": " << what;
        };
        auto same_grads = [&](const Result& a, const Result& b) {
          same(a.dmix, b.dmix, "dmix");
          same(a.skip_ds, b.skip_ds, "skip ds");
          same(a.skip_dw, b.skip_dw, "skip dw");
        };
        const Result added = run(&dx0_init, {}, false);
        {
          SCOPED_TRACE("fresh");
          const Result want = run(&zeros, {}, false), got = run(&poison, {true, false}, false);
          same(got.g, want.g, "g");
          same(got.dx0, want.dx0, "dx0");
          same_grads(got, want);
        }
        if (with_skip) {
          EXPECT_THROW(run(&dx0_init, {false, true}, false), pgolf::Error) << tag << ": takes_dx with a skip";
        } else {
          SCOPED_TRACE("takes_dx");
          const Result want = run(&dx0_init, {}, true), got = run(&dx0_init, {false, true}, false);
          same(got.dx0, want.dx0, "dx0");
          same(got.g, g, "g (not stored)");
          same_grads(got, want);
          EXPECT_NE(got.dx0, added.dx0) << tag << ": d x must be added";
        }
        if (!with_skip) {
          SCOPED_TRACE("fresh and takes_dx");
          const Result want = run(&zeros, {}, true), got = run(&poison, {true, true}, false);
          same(got.dx0, want.dx0, "dx0");
          same_grads(got, want);
        }
        {
          SCOPED_TRACE("no dx0");
          const Result got = run(nullptr, {}, false);
          same(got.g, added.g, "g");
          same_grads(got, added);
        }
      }
    }
  }
  // d x can only go into a dx0 that is given.
  const auto* some = reinterpret_cast<const float*>(uintptr_t{256});
  EXPECT_THROW(cuda::mix_norm_backward(some, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, false, nullptr,
                                       nullptr, 4, 64, 1.f, cuda::ReduceWorkspace{}, nullptr, nullptr, nullptr,
                                       cuda::Dx0Pass{false, true}),
               pgolf::Error);
}

TEST_F(ResidualOpsTest, MixNormForwardWithTheResidualBelowEqualsTheSeparatePasses) {
  for (const RowCase& c : kCases) {
    for (const bool gated : {false, true}) {
      for (const int skip : {0, 1, 2}) {  // none, plain, gated
        const std::string tag = case_name(c) + (gated ? "_gated" : "") + "_skip" + std::to_string(skip);
        SCOPED_TRACE(tag);
        const int64_t n = c.rows * c.dim;
        Rng rng(700 + c.dim + 3 * gated + skip);
        const auto x_mid = random_bf16_values(n, rng), f = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng);
        const auto s = random_bf16_values(n, rng);
        const auto mix = params_near(2 * c.dim, rng, 0.5, 0.5), scale = params_near(c.dim, rng, 1.0, 0.3);
        const auto gate = params_near(c.dim, rng, 0.0, 1.0), w = params_near(c.dim, rng, 1.0, 0.5);
        const auto skip_gate = params_near(c.dim, rng, 0.0, 1.0);
        DeviceBuffer<float> dmix(mix), dscale(scale), dgate(gate), dw(w), dskip_gate(skip_gate);
        auto dx_mid = to_device_bf16(x_mid), df = to_device_bf16(f), dx0 = to_device_bf16(x0), ds = to_device_bf16(s);

        auto run = [&](bool fused) {
          auto out = poisoned_buffer<bf16>(n), in = poisoned_buffer<bf16>(n), x_in = poisoned_buffer<bf16>(n);
          auto nn = poisoned_buffer<bf16>(n);
          DeviceBuffer<float> rstd(static_cast<size_t>(c.rows), "rstd");
          cuda::ResidualBelow below{dx_mid.data(), df.data(), dscale.data(), gated ? dgate.data() : nullptr, out.data()};
          if (skip > 0) {
            below.s = ds.data();
            below.w = dw.data();
            below.skip_gate = skip == 2 ? dskip_gate.data() : nullptr;
            below.in = in.data();
          }
          if (fused) {
            cuda::mix_norm_forward(nullptr, dx0.data(), dmix.data(), x_in.data(), nn.data(), rstd.data(), c.rows, c.dim,
                                   0.7f, nullptr, &below);
          } else {
            cuda::branch_forward(below.x_mid, below.a, below.branch_scale, below.gate, out.data(), nullptr, nullptr,
                                 c.rows, c.dim, 1.f, nullptr);
            if (skip > 0)
              cuda::skip_forward(out.data(), below.s, below.w, below.skip_gate, in.data(), c.rows, c.dim, nullptr);
            cuda::mix_norm_forward(skip > 0 ? in.data() : out.data(), dx0.data(), dmix.data(), x_in.data(), nn.data(),
                                   rstd.data(), c.rows, c.dim, 0.7f, nullptr);
          }
          sync_device();
          std::vector<std::vector<float>> r{from_device_bf16(out), from_device_bf16(x_in), from_device_bf16(nn),
                                            rstd.download()};
          if (skip > 0) r.push_back(from_device_bf16(in));
          return r;
        };
        const auto fused = run(true), separate = run(false);
        const char* names[] = {"out", "x_in", "n", "rstd", "in"};
        for (size_t i = 0; i < fused.size(); ++i) {
          ASSERT_EQ(fused[i].size(), separate[i].size()) << names[i];
          EXPECT_EQ(0, std::memcmp(fused[i].data(), separate[i].data(), fused[i].size() * sizeof(float)))
              << tag << ": " << names[i];
        }
      }
    }
  }
  EXPECT_THROW(cuda::mix_norm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4, 64, 1.f, nullptr),
               pgolf::Error);
}

// A bf16 norm gradient (norm_grad.h, a single GEMM's output) is read as the fp32 rows of the same values:
// the three norm backwards (mix_norm_backward also with the branch below folded in) give the same bits
// from either copy; the fp32 paths are checked against their CPU twins above.
TEST_F(ResidualOpsTest, Bf16NormGradientGivesTheBitsOfItsFp32Copy) {
  for (const RowCase& c : kCases) {
    const std::string tag = case_name(c);
    SCOPED_TRACE(tag);
    const int64_t n = c.rows * c.dim;
    Rng rng(500 + c.dim);
    const auto dn = random_bf16_values(n, rng);
    const auto x = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng), a = random_bf16_values(n, rng);
    const auto g = random_f32_values(n, rng), dx0_init = random_f32_values(n, rng);
    const auto mix = params_near(2 * c.dim, rng, 0.5, 0.5), scale = params_near(c.dim, rng, 1.0, 0.3);
    const auto gate = params_near(c.dim, rng, 0.0, 1.0), rstd = params_near(c.rows, rng, 1.0, 0.3);
    TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
    DeviceBuffer<float> dn32(dn), drstd(rstd), dmix(mix), dscale(scale), dgate(gate);
    auto dn16 = to_device_bf16(dn), dx = to_device_bf16(x), dx0 = to_device_bf16(x0), da = to_device_bf16(a);

    auto run = [&](cuda::NormGrad d) {
      const std::vector<float> zeros_2d(2 * c.dim, 0.f), zeros_d(c.dim, 0.f);
      DeviceBuffer<float> mix_g(g), mix_dx0(dx0_init), mix_dmix(zeros_2d), branch_g(g), branch_ds(zeros_d),
          branch_dgate(zeros_d);
      auto branch_da = poisoned_buffer<bf16>(n);
      auto norm_dx = poisoned_buffer<float>(n);
      cuda::mix_norm_backward(d, mix_g.data(), drstd.data(), dx.data(), dx0.data(), dmix.data(), mix_g.data(), false,
                              mix_dx0.data(), mix_dmix.data(), c.rows, c.dim, 0.6f, tw.ws, nullptr);
      DeviceBuffer<float> fold_g(g), fold_dx0(dx0_init), fold_dmix(zeros_2d), fold_ds(zeros_d), fold_dgate(zeros_d);
      auto fold_da = poisoned_buffer<bf16>(n);
      const cuda::BranchBelow below{da.data(), dscale.data(), dgate.data(), nullptr, fold_da.data(), fold_ds.data(),
                                    fold_dgate.data()};
      cuda::mix_norm_backward(d, fold_g.data(), drstd.data(), dx.data(), dx0.data(), dmix.data(), fold_g.data(), false,
                              fold_dx0.data(), fold_dmix.data(), c.rows, c.dim, 0.6f, tw.ws, nullptr, &below);
      cuda::branch_backward(d, branch_g.data(), nullptr, dx.data(), drstd.data(), da.data(), dscale.data(),
                            dgate.data(), branch_da.data(), branch_ds.data(), branch_dgate.data(), c.rows, c.dim, 0.5f,
                            tw.ws, nullptr);
      cuda::rmsnorm_backward(d, dx.data(), nullptr, drstd.data(), norm_dx.data(), c.rows, c.dim, 0.7f, 1.f, false,
                             nullptr);
      sync_device();
      return std::vector<std::vector<float>>{mix_g.download(),       mix_dx0.download(),   mix_dmix.download(),
                                             branch_g.download(),    from_device_bf16(branch_da),
                                             branch_ds.download(),   branch_dgate.download(), norm_dx.download(),
                                             fold_g.download(),      fold_dx0.download(),  fold_dmix.download(),
                                             from_device_bf16(fold_da), fold_ds.download(), fold_dgate.download()};
    };
    const auto from_f32 = run(dn32.data()), from_bf16 = run(dn16.data());
    const char* names[] = {"mix dx",  "mix dx0",  "dmix",      "branch g", "branch da",   "dscale",     "dgate",
                           "rmsnorm dx", "fold dx", "fold dx0", "fold dmix", "fold da", "fold dscale", "fold dgate"};
    for (size_t i = 0; i < from_f32.size(); ++i) EXPECT_EQ(from_bf16[i], from_f32[i]) << tag << ": " << names[i];
  }
}

// The staged kernels (set_row_staging: per-feature parameters and column sums in shared memory) give the bits
// of the same kernels with them in registers: mix_norm_forward with and without the residual updates below,
// mix_norm_backward with and without the branch below (a gate, a skip gradient), skip_backward with and
// without a gate, every output and parameter gradient.
TEST_F(ResidualOpsTest, StagedRowKernelsKeepTheBits) {
  const RowStagingRestore restore;
  for (const RowCase& c : kCases) {
    for (const bool gated : {false, true}) {
      const std::string tag = case_name(c) + (gated ? "_gated" : "");
      SCOPED_TRACE(tag);
      const int64_t n = c.rows * c.dim;
      Rng rng(800 + c.dim + gated);
      const auto x = random_bf16_values(n, rng), x0 = random_bf16_values(n, rng), f = random_bf16_values(n, rng);
      const auto s = random_bf16_values(n, rng), dn = random_bf16_values(n, rng);
      const auto g = random_f32_values(n, rng), g_add = random_f32_values(n, rng), dx0_init = random_f32_values(n, rng);
      const auto mix = params_near(2 * c.dim, rng, 0.5, 0.5), scale = params_near(c.dim, rng, 1.0, 0.3);
      const auto gate = params_near(c.dim, rng, 0.0, 1.0), w = params_near(c.dim, rng, 1.0, 0.5);
      const auto sums_init = random_f32_values(4 * c.dim, rng), rstd_in = params_near(c.rows, rng, 1.0, 0.3);
      TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
      DeviceBuffer<float> dmix(mix), dscale(scale), dgate(gate), dw(w), dg_add(g_add), drstd(rstd_in);
      auto dx = to_device_bf16(x), dx0 = to_device_bf16(x0), df = to_device_bf16(f), ds = to_device_bf16(s);
      auto ddn = to_device_bf16(dn);
      const float* gate_or_null = gated ? dgate.data() : nullptr;

      auto run = [&](bool staged) {
        cuda::set_row_staging(staged);
        std::vector<std::vector<float>> r;
        // Forward: plain, then with the branch below and a skip (gated with the branch).
        for (const bool folded : {false, true}) {
          auto out = poisoned_buffer<bf16>(n), in = poisoned_buffer<bf16>(n), x_in = poisoned_buffer<bf16>(n);
          auto nn = poisoned_buffer<bf16>(n);
          DeviceBuffer<float> rstd(static_cast<size_t>(c.rows), "rstd");
          const cuda::ResidualBelow below{dx.data(), df.data(), dscale.data(), gate_or_null, out.data(),
                                          ds.data(),  dw.data(), gate_or_null, in.data()};
          cuda::mix_norm_forward(folded ? nullptr : dx.data(), dx0.data(), dmix.data(), x_in.data(), nn.data(),
                                 rstd.data(), c.rows, c.dim, 0.7f, nullptr, folded ? &below : nullptr);
          sync_device();
          for (auto* t : {&x_in, &nn}) r.push_back(from_device_bf16(*t));
          r.push_back(rstd.download());
          if (folded)
            for (auto* t : {&out, &in}) r.push_back(from_device_bf16(*t));
        }
        // Backward: plain, then with the branch below (and a skip gradient when gated).
        for (const bool folded : {false, true}) {
          const std::vector<float> dmix_init(sums_init.begin(), sums_init.begin() + 2 * c.dim);
          const std::vector<float> dsc_init(sums_init.begin() + 2 * c.dim, sums_init.begin() + 3 * c.dim);
          const std::vector<float> dgt_init(sums_init.begin() + 3 * c.dim, sums_init.end());
          DeviceBuffer<float> out_g(g), out_dx0(dx0_init), out_dmix(dmix_init), out_ds(dsc_init), out_dg(dgt_init);
          auto out_da = poisoned_buffer<bf16>(n);
          const cuda::BranchBelow below{df.data(),     dscale.data(), gate_or_null, gated ? dg_add.data() : nullptr,
                                        out_da.data(), out_ds.data(), out_dg.data()};
          cuda::mix_norm_backward(ddn.data(), out_g.data(), drstd.data(), dx.data(), dx0.data(), dmix.data(),
                                  out_g.data(), false, out_dx0.data(), out_dmix.data(), c.rows, c.dim, 0.6f, tw.ws,
                                  nullptr, folded ? &below : nullptr);
          sync_device();
          for (auto* t : {&out_g, &out_dx0, &out_dmix}) r.push_back(t->download());
          if (folded) {
            r.push_back(from_device_bf16(out_da));
            for (auto* t : {&out_ds, &out_dg}) r.push_back(t->download());
          }
        }
        DeviceBuffer<float> skip_g(g), skip_ds(std::vector<float>(n, NAN)), skip_dw(std::vector<float>(g_add.begin(), g_add.begin() + c.dim)),
            skip_dgate(std::vector<float>(g_add.begin() + c.dim, g_add.begin() + 2 * c.dim));
        cuda::skip_backward(skip_g.data(), dx.data(), ds.data(), dw.data(), gate_or_null, skip_ds.data(),
                            skip_dw.data(), skip_dgate.data(), c.rows, c.dim, tw.ws, nullptr);
        sync_device();
        for (auto* t : {&skip_g, &skip_ds, &skip_dw, &skip_dgate}) r.push_back(t->download());
        return r;
      };
      const auto registers = run(false), staged = run(true);
      ASSERT_EQ(registers.size(), staged.size());
      for (size_t i = 0; i < staged.size(); ++i) {
        ASSERT_EQ(registers[i].size(), staged[i].size()) << "output " << i;
        EXPECT_EQ(0, std::memcmp(registers[i].data(), staged[i].data(), staged[i].size() * sizeof(float)))
            << tag << ": output " << i;
      }
    }
  }
}

TEST_F(ResidualOpsTest, SkipWithAndWithoutGate) {
  for (const RowCase& c : kCases) {
    for (const bool gated : {true, false}) {
      const std::string tag = case_name(c) + (gated ? "_gated" : "");
      SCOPED_TRACE(tag);
      const int64_t n = c.rows * c.dim;
      Rng rng(400 + c.dim + gated);
      const auto x = random_bf16_values(n, rng), s = random_bf16_values(n, rng);
      const auto w = params_near(c.dim, rng, 1.0, 0.3), gate = params_near(c.dim, rng, 0.0, 1.0);
      TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
      const auto gate_d = to_double(gate);
      std::vector<double> out_ref(n);
      std::vector<float> out_naive(n);
      cpu::skip_add_forward<double>(to_double(x).data(), to_double(s).data(), to_double(w).data(),
                                    gated ? gate_d.data() : nullptr, out_ref.data(), c.rows, c.dim);
      cpu::skip_add_forward<float>(x.data(), s.data(), w.data(), gated ? gate.data() : nullptr, out_naive.data(),
                                   c.rows, c.dim);
      auto dx = to_device_bf16(x), ds = to_device_bf16(s);
      DeviceBuffer<float> dw(w), dgate(gate);
      auto out = poisoned_buffer<bf16>(n);
      cuda::skip_forward(dx.data(), ds.data(), dw.data(), gated ? dgate.data() : nullptr, out.data(), c.rows, c.dim,
                         nullptr);
      sync_device();
      expect_within_naive(tag + "_out", from_device_bf16(out), rounded_bf16(out_naive), out_ref, kBf16Bound);

      const auto g = random_f32_values(n, rng), dw_init = random_f32_values(c.dim, rng);
      const auto dgate_init = random_f32_values(c.dim, rng);
      auto run_cpu = [&](auto zero) {
        using T = decltype(zero);
        std::vector<T> dxo(n, T(0)), dso(n, T(0)), dwo(dw_init.begin(), dw_init.end());
        std::vector<T> dgo(dgate_init.begin(), dgate_init.end());
        const std::vector<T> gT(g.begin(), g.end()), xT(x.begin(), x.end()), sT(s.begin(), s.end());
        const std::vector<T> wT(w.begin(), w.end()), gateT(gate.begin(), gate.end());
        cpu::skip_add_backward<T>(gT.data(), xT.data(), sT.data(), wT.data(), gated ? gateT.data() : nullptr,
                                  dxo.data(), dso.data(), dwo.data(), dgo.data(), c.rows, c.dim);
        return std::make_tuple(dxo, dso, dwo, dgo);
      };
      const auto [dx_ref, ds_ref, dw_ref, dg_ref] = run_cpu(0.0);
      const auto [dx_naive, ds_naive, dw_naive, dg_naive] = run_cpu(0.f);
      DeviceBuffer<float> dg(g), dds(std::vector<float>(n, NAN)), ddw(dw_init), ddg(dgate_init);
      cuda::skip_backward(dg.data(), dx.data(), ds.data(), dw.data(), gated ? dgate.data() : nullptr, dds.data(),
                          ddw.data(), ddg.data(), c.rows, c.dim, tw.ws, nullptr);
      sync_device();
      if (gated) expect_within_naive(tag + "_dx", dg.download(), dx_naive, dx_ref, kF32Bound);
      else EXPECT_EQ(dg.download(), g) << "without a gate d x = d out";
      expect_within_naive(tag + "_ds", dds.download(), ds_naive, ds_ref, kF32Bound);
      expect_within_naive(tag + "_dw", ddw.download(), dw_naive, dw_ref, kF32Bound);
      if (gated) expect_within_naive(tag + "_dgate", ddg.download(), dg_naive, dg_ref, kF32Bound);
    }
  }
}

TEST_F(ResidualOpsTest, ParallelLanesMatchBranchScalesThenLaneUpdate) {
  for (const RowCase& c : kCases) {
    const std::string tag = case_name(c);
    SCOPED_TRACE(tag);
    const int64_t n = c.rows * c.dim;
    Rng rng(500 + c.dim);
    const auto l0 = random_bf16_values(n, rng), l1 = random_bf16_values(n, rng);
    const auto a = random_bf16_values(n, rng), f = random_bf16_values(n, rng);
    const auto as = params_near(c.dim, rng, 1.0, 0.3), ms = params_near(c.dim, rng, 1.0, 0.3);
    const auto resid = params_near(2, rng, 1.1, 0.1), post = params_near(4, rng, 1.0, 0.3);
    TestWorkspace tw(cuda::residual_workspace_floats(c.rows, c.dim));
    auto run_fwd = [&](auto zero) {
      using T = decltype(zero);
      const std::vector<T> l0T(l0.begin(), l0.end()), l1T(l1.begin(), l1.end()), aT(a.begin(), a.end());
      const std::vector<T> fT(f.begin(), f.end()), asT(as.begin(), as.end()), msT(ms.begin(), ms.end());
      const std::vector<T> rT(resid.begin(), resid.end()), pT(post.begin(), post.end());
      std::vector<T> a_s(n), f_s(n), o0(n), o1(n);
      cpu::branch_add_forward<T>(nullptr, aT.data(), asT.data(), nullptr, a_s.data(), c.rows, c.dim);
      cpu::branch_add_forward<T>(nullptr, fT.data(), msT.data(), nullptr, f_s.data(), c.rows, c.dim);
      cpu::lane_update_forward<T>(l0T.data(), l1T.data(), a_s.data(), f_s.data(), rT.data(), pT.data(), o0.data(),
                                  o1.data(), c.rows, c.dim);
      return std::make_tuple(o0, o1, a_s, f_s);
    };
    const auto [o0_ref, o1_ref, as_ref, fs_ref] = run_fwd(0.0);
    const auto [o0_naive, o1_naive, as_naive, fs_naive] = run_fwd(0.f);
    auto d_l0 = to_device_bf16(l0), d_l1 = to_device_bf16(l1), d_a = to_device_bf16(a), d_f = to_device_bf16(f);
    DeviceBuffer<float> d_as(as), d_ms(ms), d_r(resid), d_p(post);
    auto o0 = poisoned_buffer<bf16>(n), o1 = poisoned_buffer<bf16>(n);
    cuda::lanes_forward(d_l0.data(), d_l1.data(), d_a.data(), d_f.data(), d_as.data(), d_ms.data(), d_r.data(),
                        d_p.data(), o0.data(), o1.data(), c.rows, c.dim, nullptr);
    sync_device();
    expect_within_naive(tag + "_out0", from_device_bf16(o0), rounded_bf16(o0_naive), o0_ref, kBf16Bound);
    expect_within_naive(tag + "_out1", from_device_bf16(o1), rounded_bf16(o1_naive), o1_ref, kBf16Bound);

    const auto g0 = random_f32_values(n, rng), g1 = random_f32_values(n, rng);
    const auto das_init = random_f32_values(c.dim, rng), dms_init = random_f32_values(c.dim, rng);
    const auto dr_init = random_f32_values(2, rng), dp_init = random_f32_values(4, rng);
    auto run_bwd = [&](auto zero, const auto& a_s, const auto& f_s) {
      using T = decltype(zero);
      const std::vector<T> g0T(g0.begin(), g0.end()), g1T(g1.begin(), g1.end()), l0T(l0.begin(), l0.end());
      const std::vector<T> l1T(l1.begin(), l1.end()), aT(a.begin(), a.end()), fT(f.begin(), f.end());
      const std::vector<T> asT(as.begin(), as.end()), msT(ms.begin(), ms.end()), rT(resid.begin(), resid.end());
      const std::vector<T> pT(post.begin(), post.end());
      std::vector<T> dl0(n, T(0)), dl1(n, T(0)), das_(n, T(0)), dfs_(n, T(0)), da(n, T(0)), df(n, T(0));
      std::vector<T> dasc(das_init.begin(), das_init.end()), dmsc(dms_init.begin(), dms_init.end());
      std::vector<T> dr(dr_init.begin(), dr_init.end()), dp(dp_init.begin(), dp_init.end());
      cpu::lane_update_backward<T>(g0T.data(), g1T.data(), l0T.data(), l1T.data(), a_s.data(), f_s.data(), rT.data(),
                                   pT.data(), dl0.data(), dl1.data(), das_.data(), dfs_.data(), dr.data(), dp.data(),
                                   c.rows, c.dim);
      cpu::branch_add_backward<T>(das_.data(), aT.data(), asT.data(), nullptr, da.data(), dasc.data(), nullptr, c.rows,
                                  c.dim);
      cpu::branch_add_backward<T>(dfs_.data(), fT.data(), msT.data(), nullptr, df.data(), dmsc.data(), nullptr, c.rows,
                                  c.dim);
      return std::make_tuple(dl0, dl1, da, df, dasc, dmsc, dr, dp);
    };
    const auto [dl0_ref, dl1_ref, da_ref, df_ref, das_ref, dms_ref, dr_ref, dp_ref] = run_bwd(0.0, as_ref, fs_ref);
    const auto [dl0_n, dl1_n, da_n, df_n, das_n, dms_n, dr_n, dp_n] = run_bwd(0.f, as_naive, fs_naive);
    DeviceBuffer<float> dg0(g0), dg1(g1), ddas(das_init), ddms(dms_init), ddr(dr_init), ddp(dp_init);
    auto dda = poisoned_buffer<bf16>(n), ddf = poisoned_buffer<bf16>(n);
    cuda::lanes_backward(dg0.data(), dg1.data(), d_l0.data(), d_l1.data(), d_a.data(), d_f.data(), d_as.data(),
                         d_ms.data(), d_r.data(), d_p.data(), dda.data(), ddf.data(), ddas.data(), ddms.data(),
                         ddr.data(), ddp.data(), c.rows, c.dim, tw.ws, nullptr);
    sync_device();
    expect_within_naive(tag + "_dlane0", dg0.download(), dl0_n, dl0_ref, kF32Bound);
    expect_within_naive(tag + "_dlane1", dg1.download(), dl1_n, dl1_ref, kF32Bound);
    expect_within_naive(tag + "_da", from_device_bf16(dda), rounded_bf16(da_n), da_ref, kBf16Bound);
    expect_within_naive(tag + "_df", from_device_bf16(ddf), rounded_bf16(df_n), df_ref, kBf16Bound);
    expect_within_naive(tag + "_dattn_scale", ddas.download(), das_n, das_ref, kF32Bound);
    expect_within_naive(tag + "_dmlp_scale", ddms.download(), dms_n, dms_ref, kF32Bound);
    expect_within_naive(tag + "_dresid", ddr.download(), dr_n, dr_ref, kF32Bound);
    expect_within_naive(tag + "_dpost", ddp.download(), dp_n, dp_ref, kF32Bound);
  }
}

TEST_F(ResidualOpsTest, SmearGateWithinRows) {
  struct SmearCase {
    int64_t rows, seq_len;
    int dim;
  };
  for (const SmearCase c : {SmearCase{3, 37, 64}, SmearCase{2, 2300, 256}, SmearCase{5, 11, 768}}) {
    const std::string tag = std::to_string(c.rows) + "x" + std::to_string(c.seq_len) + "x" + std::to_string(c.dim);
    SCOPED_TRACE(tag);
    const int64_t n = c.rows * c.seq_len * c.dim;
    Rng rng(600 + c.dim);
    const auto x = random_bf16_values(n, rng), gate = params_near(c.dim, rng, 0.0, 1.0);
    std::vector<double> y_ref(n);
    std::vector<float> y_naive(n);
    cpu::smear_forward<double>(to_double(x).data(), to_double(gate).data(), y_ref.data(), c.rows, c.seq_len, c.dim);
    cpu::smear_forward<float>(x.data(), gate.data(), y_naive.data(), c.rows, c.seq_len, c.dim);
    auto dx = to_device_bf16(x);
    DeviceBuffer<float> dgate(gate);
    auto y = poisoned_buffer<bf16>(n);
    cuda::smear_forward(dx.data(), dgate.data(), y.data(), c.rows, c.seq_len, c.dim, nullptr);
    sync_device();
    expect_within_naive(tag + "_y", from_device_bf16(y), rounded_bf16(y_naive), y_ref, kBf16Bound);

    const auto dy = random_f32_values(n, rng), dx_init = random_f32_values(n, rng);
    const auto dgate_init = random_f32_values(c.dim, rng);
    std::vector<double> dx_ref(dx_init.begin(), dx_init.end()), dg_ref(dgate_init.begin(), dgate_init.end());
    std::vector<float> dx_naive = dx_init, dg_naive = dgate_init;
    cpu::smear_backward<double>(to_double(dy).data(), to_double(x).data(), to_double(gate).data(), dx_ref.data(),
                                dg_ref.data(), c.rows, c.seq_len, c.dim);
    cpu::smear_backward<float>(dy.data(), x.data(), gate.data(), dx_naive.data(), dg_naive.data(), c.rows, c.seq_len,
                               c.dim);
    TestWorkspace tw(cuda::residual_workspace_floats(c.rows * c.seq_len, c.dim));
    DeviceBuffer<float> ddy(dy), ddx(dx_init), ddg(dgate_init);
    cuda::smear_backward(ddy.data(), dx.data(), dgate.data(), ddx.data(), ddg.data(), c.rows, c.seq_len, c.dim, tw.ws,
                         nullptr);
    sync_device();
    expect_within_naive(tag + "_dx", ddx.download(), dx_naive, dx_ref, kF32Bound);
    expect_within_naive(tag + "_dgate", ddg.download(), dg_naive, dg_ref, kF32Bound);

    // Without accumulation dx is written, not read: the bits of a pass on a cleared dx.
    DeviceBuffer<float> cleared(std::vector<float>(n, 0.f)), written(std::vector<float>(n, NAN));
    DeviceBuffer<float> dg_cleared(dgate_init), dg_written(dgate_init);
    cuda::smear_backward(ddy.data(), dx.data(), dgate.data(), cleared.data(), dg_cleared.data(), c.rows, c.seq_len,
                         c.dim, tw.ws, nullptr);
    cuda::smear_backward(ddy.data(), dx.data(), dgate.data(), written.data(), dg_written.data(), c.rows, c.seq_len,
                         c.dim, tw.ws, nullptr, /*accumulate=*/false);
    sync_device();
    const auto want = cleared.download(), got = written.download();
    EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float))) << tag << ": dx written";
    EXPECT_EQ(dg_cleared.download(), dg_written.download()) << tag << ": dgate";
  }
}

}  // namespace
}  // namespace pgolf::test
