#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

#include "backend/cuda/arena.h"
#include "backend/cuda/check.h"
#include "backend/cuda/gemm.h"

#include <chrono>

// cuBLASLt is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix (its
// transpose) with the same memory, so the row-major product D = op(A) op(B) is computed as the
// column-major product Dᵀ = op(B)ᵀ op(A)ᵀ: cuBLAS's first operand is our B, its second our A, its
// m is our n and its n our m; the transpose flags carry over unchanged.

namespace pgolf::cuda {
namespace {

std::string shape_text(const GemmShape& s) {
  return "GEMM m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) +
         " trans_a=" + std::to_string(s.trans_a) + " trans_b=" + std::to_string(s.trans_b) +
         " output=" + (s.output == GemmOutput::kBf16 ? "bf16" : "fp32") + " batch=" + std::to_string(s.batch) +
         " lda=" + std::to_string(s.lda) + " ldb=" + std::to_string(s.ldb) + " ldd=" + std::to_string(s.ldd);
}

void check_cublas(cublasStatus_t status, const char* expr, const GemmShape& shape, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  std::string msg = std::string("cuBLAS error ") + cublasLtGetStatusName(status) + " (" +
                    cublasLtGetStatusString(status) + ") in " + expr + " for " + shape_text(shape);
  raise_error(msg.c_str(), __FILE__, line);
}
#define PG_CUBLAS_CHECK(expr, shape) check_cublas((expr), #expr, (shape), __LINE__)

// The largest power of two (at most 256) dividing the address of every matrix (and, with a row
// stride, of every row) of a batch.
uint16_t alignment_of(const void* p, int batch, int64_t stride_elems, int64_t ld_elems, size_t elem_bytes) {
  uint64_t bits = reinterpret_cast<uint64_t>(p) | 256;
  if (batch > 1) bits |= static_cast<uint64_t>(stride_elems) * elem_bytes;
  if (ld_elems > 0) bits |= static_cast<uint64_t>(ld_elems) * elem_bytes;
  return static_cast<uint16_t>(bits & (~bits + 1));  // lowest set bit
}

struct PlanKey {
  GemmShape shape;
  uint16_t align_a = 0, align_b = 0, align_d = 0;

  bool operator==(const PlanKey& o) const {
    const GemmShape &x = shape, &y = o.shape;
    return x.m == y.m && x.n == y.n && x.k == y.k && x.trans_a == y.trans_a && x.trans_b == y.trans_b &&
           x.output == y.output && x.epilogue == y.epilogue && x.batch == y.batch && x.stride_a == y.stride_a &&
           x.stride_b == y.stride_b && x.stride_d == y.stride_d && x.lda == y.lda && x.ldb == y.ldb &&
           x.ldd == y.ldd && align_a == o.align_a &&
           align_b == o.align_b && align_d == o.align_d;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    const GemmShape& s = key.shape;
    uint64_t h = 0xcbf29ce484222325ull;
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 0x100000001b3ull; };
    mix(static_cast<uint64_t>(s.m));
    mix(static_cast<uint64_t>(s.n));
    mix(static_cast<uint64_t>(s.k));
    mix((uint64_t{s.trans_a} << 1) | uint64_t{s.trans_b} | (uint64_t(s.output) << 2) | (uint64_t(s.epilogue) << 4));
    mix(static_cast<uint64_t>(s.batch));
    mix(static_cast<uint64_t>(s.stride_a));
    mix(static_cast<uint64_t>(s.stride_b));
    mix(static_cast<uint64_t>(s.stride_d));
    mix(static_cast<uint64_t>(s.lda) ^ (static_cast<uint64_t>(s.ldb) << 21) ^ (static_cast<uint64_t>(s.ldd) << 42));
    mix((uint64_t{key.align_a} << 32) | (uint64_t{key.align_b} << 16) | key.align_d);
    return static_cast<size_t>(h);
  }
};

std::atomic<bool> g_autotune{false};
// The algorithm each tuned key chose, for the whole process: every runner (every model, engine and rank
// thread) then uses the same one for the same product, so two engines of one process give the same bits.
std::mutex g_tuned_mutex;
std::unordered_map<PlanKey, cublasLtMatmulAlgo_t, PlanKeyHash> g_tuned;
constexpr int kTuneCandidates = 8;    // the heuristic's best that a plan's first run times
constexpr int kTuneRuns = 5;          // timed runs per candidate (after one untimed)
constexpr float kTuneMargin = 0.97f;  // a candidate replaces the heuristic's first only when this much faster

// Descriptor, layouts (cuBLAS's first operand = our B, second = our A) and the chosen algorithm.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_first = nullptr, layout_second = nullptr, layout_d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  // With autotuning: the heuristic's candidates, best first (algo is the first until the plan's first run
  // times them), and whether that run has happened.
  cublasLtMatmulAlgo_t candidates[kTuneCandidates]{};
  int candidate_count = 0;
  bool tuned = false;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (layout_first) cublasLtMatrixLayoutDestroy(layout_first);
    if (layout_second) cublasLtMatrixLayoutDestroy(layout_second);
    if (layout_d) cublasLtMatrixLayoutDestroy(layout_d);
  }
};

// Column-major layout of a row-major [rows, cols] matrix with row stride `ld` (0: cols), seen by
// cuBLAS as [cols, rows] with leading dimension ld.
cublasLtMatrixLayout_t make_layout(cudaDataType_t type, int rows, int cols, int64_t ld, int batch, int64_t stride,
                                   const GemmShape& shape) {
  cublasLtMatrixLayout_t layout = nullptr;
  PG_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(cols),
                                             static_cast<uint64_t>(rows), ld > 0 ? ld : static_cast<int64_t>(cols)),
                  shape);
  if (batch > 1) {
    int32_t count = batch;
    PG_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                     sizeof(count)),
                    shape);
    PG_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                     sizeof(stride)),
                    shape);
  }
  return layout;
}

}  // namespace

void set_gemm_autotune(bool on) { g_autotune = on; }
bool gemm_autotune() { return g_autotune; }

struct GemmRunner::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
  double plan_seconds = 0.0;

  Plan& plan_for(const PlanKey& key);
  void tune(Plan& plan, const PlanKey& key, const __nv_bfloat16* a, const __nv_bfloat16* b, void* d,
            size_t d_bytes, float alpha, float beta, cudaStream_t stream);
};

// Times the plan's candidates on the call's own operands and keeps the fastest (the median of kTuneRuns)
// when it beats the heuristic's first by kTuneMargin; ties keep the heuristic's order, so a choice moves
// only on a clear difference. The choice is the process's for this key from then on (g_tuned). D is
// written by every run: with beta != 0 its contents are saved first and put back, so the call then
// computes what it would have. Not while the stream is being captured (the plan stays untuned and is
// timed at its next eager run), nor when the copy of D cannot be allocated.
void GemmRunner::Impl::tune(Plan& plan, const PlanKey& key, const __nv_bfloat16* a, const __nv_bfloat16* b,
                            void* d, size_t d_bytes, float alpha, float beta, cudaStream_t stream) {
  const GemmShape& shape = key.shape;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PG_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  plan.tuned = true;
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t d_elems = static_cast<int64_t>(shape.batch > 1 ? shape.stride_d * (shape.batch - 1) : 0) +
                          static_cast<int64_t>(shape.m - 1) * (shape.ldd > 0 ? shape.ldd : shape.n) + shape.n;
  const size_t saved_bytes = beta != 0.f ? static_cast<size_t>(d_elems) * d_bytes : 0;
  void* saved = nullptr;
  if (saved_bytes > 0) {
    if (cudaMalloc(&saved, saved_bytes) != cudaSuccess) {
      (void)cudaGetLastError();  // out of memory: keep the heuristic's choice
      return;
    }
    PG_CUDA_CHECK(cudaMemcpyAsync(saved, d, saved_bytes, cudaMemcpyDeviceToDevice, stream));
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  PG_CUDA_CHECK(cudaEventCreate(&start));
  PG_CUDA_CHECK(cudaEventCreate(&stop));
  const float zero = 0.f;
  float median[kTuneCandidates] = {};
  for (int c = 0; c < plan.candidate_count; ++c) {
    float ms[kTuneRuns];
    for (int r = -1; r < kTuneRuns; ++r) {
      PG_CUDA_CHECK(cudaEventRecord(start, stream));
      const cublasStatus_t st =
          cublasLtMatmul(handle, plan.desc, &alpha, b, plan.layout_first, a, plan.layout_second, &zero, d,
                         plan.layout_d, d, plan.layout_d, &plan.candidates[c], workspace, workspace_bytes, stream);
      PG_CUDA_CHECK(cudaEventRecord(stop, stream));
      PG_CUDA_CHECK(cudaEventSynchronize(stop));
      if (st != CUBLAS_STATUS_SUCCESS) {  // a candidate that does not run is not chosen
        ms[0] = -1.f;
        break;
      }
      if (r >= 0) PG_CUDA_CHECK(cudaEventElapsedTime(&ms[r], start, stop));
    }
    if (ms[0] < 0.f) {
      median[c] = -1.f;
      continue;
    }
    std::sort(ms, ms + kTuneRuns);
    median[c] = ms[kTuneRuns / 2];
  }
  int best = 0;
  for (int c = 1; c < plan.candidate_count; ++c)
    if (median[c] >= 0.f && median[0] >= 0.f && median[c] < kTuneMargin * median[best]) best = c;
  {
    const std::lock_guard<std::mutex> lock(g_tuned_mutex);
    plan.algo = g_tuned.emplace(key, plan.candidates[best]).first->second;  // another thread's choice stands
  }
  PG_CUDA_CHECK(cudaEventDestroy(start));
  PG_CUDA_CHECK(cudaEventDestroy(stop));
  if (saved) {
    PG_CUDA_CHECK(cudaMemcpyAsync(d, saved, saved_bytes, cudaMemcpyDeviceToDevice, stream));
    PG_CUDA_CHECK(cudaStreamSynchronize(stream));
    PG_CUDA_CHECK(cudaFree(saved));
  }
  plan_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Plan& GemmRunner::Impl::plan_for(const PlanKey& key) {
  auto it = plans.find(key);
  if (it != plans.end()) return *it->second;
  const auto t0 = std::chrono::steady_clock::now();

  const GemmShape& s = key.shape;
  const cudaDataType_t d_type = s.output == GemmOutput::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
  auto plan = std::make_unique<Plan>();
  PG_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), s);
  cublasOperation_t op_first = s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t op_second = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  PG_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)), s);
  PG_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)), s);
  if (s.epilogue == GemmEpilogue::kBias) {
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    PG_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                                   sizeof(epilogue)),
                    s);
    PG_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &d_type,
                                                   sizeof(d_type)),
                    s);
  }
  // Stored shapes: B is [k, n] or [n, k]; A is [m, k] or [k, m]; D is [m, n].
  plan->layout_first = s.trans_b ? make_layout(CUDA_R_16BF, s.n, s.k, s.ldb, s.batch, s.stride_b, s)
                                 : make_layout(CUDA_R_16BF, s.k, s.n, s.ldb, s.batch, s.stride_b, s);
  plan->layout_second = s.trans_a ? make_layout(CUDA_R_16BF, s.k, s.m, s.lda, s.batch, s.stride_a, s)
                                  : make_layout(CUDA_R_16BF, s.m, s.k, s.lda, s.batch, s.stride_a, s);
  plan->layout_d = make_layout(d_type, s.m, s.n, s.ldd, s.batch, s.stride_d, s);

  cublasLtMatmulPreference_t pref = nullptr;
  PG_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref), s);
  auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t attr, const void* value, size_t bytes) {
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, attr, value, bytes);
    if (st != CUBLAS_STATUS_SUCCESS) cublasLtMatmulPreferenceDestroy(pref);
    PG_CUBLAS_CHECK(st, s);
  };
  uint64_t ws = workspace_bytes;
  uint32_t align_first = key.align_b, align_second = key.align_a, align_d = key.align_d;
  set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_first, sizeof(align_first));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_second, sizeof(align_second));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d));
  // bf16 output: a split-K's partial sums are reduced in fp32 (or K is not split), so that every output is
  // one rounding of its fp32 sum, the rounding the CPU twins model (CpuModel::set_bf16_norm_grads). The
  // default also allows reductions in the output type: a bf16 rounding per split.
  if (s.output == GemmOutput::kBf16) {
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    set_pref(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes));
  }

  const int wanted = gemm_autotune() ? kTuneCandidates : 1;
  cublasLtMatmulHeuristicResult_t results[kTuneCandidates]{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->layout_first, plan->layout_second,
                                                     plan->layout_d, plan->layout_d, pref, wanted, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  PG_CUBLAS_CHECK(st, s);
  if (found == 0) {
    std::string msg = "cuBLASLt has no algorithm for " + shape_text(s);
    raise_error(msg.c_str(), __FILE__, __LINE__);
  }
  plan->algo = results[0].algo;
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) plan->candidates[plan->candidate_count++] = results[i].algo;
  plan->tuned = plan->candidate_count < 2;
  if (!plan->tuned) {  // chosen before, by this process
    const std::lock_guard<std::mutex> lock(g_tuned_mutex);
    auto chosen = g_tuned.find(key);
    if (chosen != g_tuned.end()) plan->algo = chosen->second, plan->tuned = true;
  }
  plan_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return *plans.emplace(key, std::move(plan)).first->second;
}

GemmRunner::GemmRunner(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  PG_CUBLAS_CHECK(cublasLtCreate(&impl_->handle), GemmShape{});
  impl_->workspace_bytes = workspace_bytes;
  impl_->workspace = device_malloc(workspace_bytes, "the cuBLASLt workspace");
}

GemmRunner::~GemmRunner() {
  impl_->plans.clear();
  if (impl_->workspace) cudaFree(impl_->workspace);
  if (impl_->handle) cublasLtDestroy(impl_->handle);
}

size_t GemmRunner::cached_plans() const { return impl_->plans.size(); }
double GemmRunner::plan_seconds() const { return impl_->plan_seconds; }

void GemmRunner::run(const GemmShape& shape, const __nv_bfloat16* a, const __nv_bfloat16* b, void* d, float alpha,
                     float beta, cudaStream_t stream, const void* bias) {
  if (shape.m <= 0 || shape.n <= 0 || shape.k <= 0 || shape.batch <= 0) {
    std::string msg = "invalid " + shape_text(shape) + ": every size must be positive";
    raise_error(msg.c_str(), __FILE__, __LINE__);
  }
  PG_CUDA_REQUIRE(a && b && d, "GemmRunner::run: null operand");
  {
    const int a_cols = shape.trans_a ? shape.m : shape.k, b_cols = shape.trans_b ? shape.k : shape.n;
    if ((shape.lda != 0 && shape.lda < a_cols) || (shape.ldb != 0 && shape.ldb < b_cols) ||
        (shape.ldd != 0 && shape.ldd < shape.n)) {
      std::string msg = "invalid " + shape_text(shape) + ": a row stride is smaller than its matrix's row";
      raise_error(msg.c_str(), __FILE__, __LINE__);
    }
  }
  PG_CUDA_REQUIRE((shape.epilogue == GemmEpilogue::kBias) == (bias != nullptr),
                  "GemmRunner::run: a bias pointer is given exactly when the epilogue is kBias");
  PG_CUDA_REQUIRE(shape.epilogue == GemmEpilogue::kNone || shape.batch == 1,
                  "GemmRunner::run: the bias epilogue is for unbatched products");
  const size_t d_bytes = shape.output == GemmOutput::kBf16 ? 2 : 4;
  PlanKey key{shape, alignment_of(a, shape.batch, shape.stride_a, shape.lda, 2),
              alignment_of(b, shape.batch, shape.stride_b, shape.ldb, 2),
              alignment_of(d, shape.batch, shape.stride_d, shape.ldd, d_bytes)};
  Plan& plan = impl_->plan_for(key);
  if (bias) {
    PG_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), shape);
  }
  if (!plan.tuned) impl_->tune(plan, key, a, b, d, d_bytes, alpha, beta, stream);
  PG_CUBLAS_CHECK(cublasLtMatmul(impl_->handle, plan.desc, &alpha, b, plan.layout_first, a, plan.layout_second, &beta,
                                 d, plan.layout_d, d, plan.layout_d, &plan.algo, impl_->workspace,
                                 impl_->workspace_bytes, stream),
                  shape);
}

void linear_forward(GemmRunner& g, const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int tokens,
                    int in_features, int out_features, cudaStream_t stream) {
  GemmShape s;
  s.m = tokens, s.n = out_features, s.k = in_features, s.trans_b = true;
  g.run(s, x, w, y, 1.0f, 0.0f, stream);
}

void linear_backward_input(GemmRunner& g, const __nv_bfloat16* dy, const __nv_bfloat16* w, __nv_bfloat16* dx,
                           int tokens, int in_features, int out_features, cudaStream_t stream) {
  GemmShape s;
  s.m = tokens, s.n = in_features, s.k = out_features;
  g.run(s, dy, w, dx, 1.0f, 0.0f, stream);
}

void linear_backward_weight(GemmRunner& g, const __nv_bfloat16* dy, const __nv_bfloat16* x, float* dw, int tokens,
                            int in_features, int out_features, float beta, cudaStream_t stream) {
  GemmShape s;
  s.m = out_features, s.n = in_features, s.k = tokens, s.trans_a = true, s.output = GemmOutput::kF32;
  g.run(s, dy, x, dw, 1.0f, beta, stream);
}

}  // namespace pgolf::cuda
