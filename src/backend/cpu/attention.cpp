#include "backend/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/gemm.h"
#include "backend/cpu/parallel.h"
#include "core/error.h"

namespace pgolf::cpu {

void check_cu_seqlens(const int32_t* cu, int64_t num_segments, int64_t tokens) {
  PG_CHECK(num_segments >= 1, "cu_seqlens needs at least two entries, got {}", num_segments + 1);
  PG_CHECK(cu[0] == 0, "cu_seqlens[0] must be 0, got {}", cu[0]);
  for (int64_t s = 0; s < num_segments; ++s)
    PG_CHECK(cu[s + 1] >= cu[s], "cu_seqlens must be non-decreasing: cu[{}] = {} < cu[{}] = {}", s + 1, cu[s + 1], s,
             cu[s]);
  PG_CHECK(cu[num_segments] == tokens, "cu_seqlens ends at {}, the batch has {} tokens", cu[num_segments], tokens);
}

namespace {

// Query rows per block: a block's scores are one [rows, keys] GEMM, and only the keys up to the
// block's last row are touched (half of the causal triangle's waste is skipped).
constexpr int64_t kQueryBlock = 128;

// Work items are (segment, KV head) pairs: the KV rows of one head in one segment are read — and in
// the backward written — by one thread only, which serves every query head of the group.
struct Item {
  int64_t begin, len;
  int g;
};

std::vector<Item> work_items(const int32_t* cu, int64_t num_segments, int kv_heads) {
  std::vector<Item> items;
  for (int64_t s = 0; s < num_segments; ++s)
    if (cu[s + 1] > cu[s])
      for (int g = 0; g < kv_heads; ++g) items.push_back({cu[s], cu[s + 1] - cu[s], g});
  return items;
}

// p[r, 0..keys) = exp(s[r, j] − lse) for the causal keys j <= i0 + r, 0 beyond (row stride `keys`).
template <typename T>
void causal_probs(T* p, int64_t rows, int64_t keys, int64_t i0, const T* lse, int64_t lse_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    T* pr = p + r * keys;
    const T l = lse[r * lse_stride];
    const int64_t last = i0 + r;
    for (int64_t j = 0; j <= last; ++j) pr[j] = std::exp(pr[j] - l);
    for (int64_t j = last + 1; j < keys; ++j) pr[j] = T(0);
  }
}

}  // namespace

// For each (segment, KV head, query head) and block of query rows [i0, i1):
//   S = scale·Q Kᵀ [rows, i1]; causal mask; lse = logsumexp(S); P = exp(S − lse); Y = P V.
template <typename T>
void attention_forward(const T* q, const T* k, const T* v, T* y, T* lse, const int32_t* cu, int64_t num_segments,
                       const AttentionShape& s, T scale) {
  check_cu_seqlens(cu, num_segments, s.tokens);
  const int H = s.heads, Hkv = s.kv_heads, Dh = s.head_dim, group = H / Hkv;
  PG_CHECK(Hkv > 0 && H % Hkv == 0, "attention: {} heads are not a multiple of {} KV heads", H, Hkv);
  const int64_t qs = static_cast<int64_t>(H) * Dh, ks = static_cast<int64_t>(Hkv) * Dh;  // row strides
  const std::vector<Item> items = work_items(cu, num_segments, Hkv);
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel if (n_items > 1 && parallel_worth(s.tokens * s.heads * s.head_dim))
  {
    std::vector<T> sc;
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item w = items[static_cast<size_t>(it)];
      const T* kg = k + w.begin * ks + w.g * Dh;
      const T* vg = v + w.begin * ks + w.g * Dh;
      for (int hq = 0; hq < group; ++hq) {
        const int h = w.g * group + hq;
        for (int64_t i0 = 0; i0 < w.len; i0 += kQueryBlock) {
          const int64_t i1 = std::min(w.len, i0 + kQueryBlock), rows = i1 - i0, keys = i1;
          sc.resize(static_cast<size_t>(rows * keys));
          const T* qb = q + (w.begin + i0) * qs + h * Dh;
          gemm<T>(false, true, rows, keys, Dh, scale, qb, qs, kg, ks, T(0), sc.data(), keys);
          T* lb = lse + (w.begin + i0) * H + h;
          for (int64_t r = 0; r < rows; ++r) {
            const T* sr = sc.data() + r * keys;
            T mx = -std::numeric_limits<T>::infinity();
            for (int64_t j = 0; j <= i0 + r; ++j) mx = std::max(mx, sr[j]);
            T sum = 0;
            for (int64_t j = 0; j <= i0 + r; ++j) sum += std::exp(sr[j] - mx);
            lb[r * H] = mx + std::log(sum);
          }
          causal_probs(sc.data(), rows, keys, i0, lb, H);
          gemm<T>(false, false, rows, Dh, keys, T(1), sc.data(), keys, vg, ks, T(0), y + (w.begin + i0) * qs + h * Dh,
                  qs);
        }
      }
    }
  }
}

// With P = exp(S − lse) recomputed per block:  dP = dY Vᵀ;  D_i = dY_i·Y_i;  dS = P ⊙ (dP − D);
// dQ += scale·dS K;  dK += scale·dSᵀ Q;  dV += Pᵀ dY.
template <typename T>
void attention_backward(const T* dy, const T* q, const T* k, const T* v, const T* y, const T* lse, T* dq, T* dk,
                        T* dv, const int32_t* cu, int64_t num_segments, const AttentionShape& s, T scale) {
  check_cu_seqlens(cu, num_segments, s.tokens);
  const int H = s.heads, Hkv = s.kv_heads, Dh = s.head_dim, group = H / Hkv;
  const int64_t qs = static_cast<int64_t>(H) * Dh, ks = static_cast<int64_t>(Hkv) * Dh;
  const std::vector<Item> items = work_items(cu, num_segments, Hkv);
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel if (n_items > 1 && parallel_worth(s.tokens * s.heads * s.head_dim))
  {
    std::vector<T> p, dp;
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item w = items[static_cast<size_t>(it)];
      const int64_t off_kv = w.begin * ks + w.g * Dh;
      for (int hq = 0; hq < group; ++hq) {
        const int h = w.g * group + hq;
        for (int64_t i0 = 0; i0 < w.len; i0 += kQueryBlock) {
          const int64_t i1 = std::min(w.len, i0 + kQueryBlock), rows = i1 - i0, keys = i1;
          const int64_t off_q = (w.begin + i0) * qs + h * Dh;
          p.resize(static_cast<size_t>(rows * keys));
          dp.resize(p.size());
          gemm<T>(false, true, rows, keys, Dh, scale, q + off_q, qs, k + off_kv, ks, T(0), p.data(), keys);
          causal_probs(p.data(), rows, keys, i0, lse + (w.begin + i0) * H + h, H);
          gemm<T>(false, true, rows, keys, Dh, T(1), dy + off_q, qs, v + off_kv, ks, T(0), dp.data(), keys);
          for (int64_t r = 0; r < rows; ++r) {
            const T* dyr = dy + off_q + r * qs;
            const T* yr = y + off_q + r * qs;
            T D = 0;
            for (int d = 0; d < Dh; ++d) D += dyr[d] * yr[d];
            T* dpr = dp.data() + r * keys;
            const T* pr = p.data() + r * keys;
            for (int64_t j = 0; j < keys; ++j) dpr[j] = pr[j] * (dpr[j] - D) * scale;  // dS·scale (0 past the mask)
          }
          gemm<T>(false, false, rows, Dh, keys, T(1), dp.data(), keys, k + off_kv, ks, T(1), dq + off_q, qs);
          gemm<T>(true, false, keys, Dh, rows, T(1), dp.data(), keys, q + off_q, qs, T(1), dk + off_kv, ks);
          gemm<T>(true, false, keys, Dh, rows, T(1), p.data(), keys, dy + off_q, qs, T(1), dv + off_kv, ks);
        }
      }
    }
  }
}

template void attention_forward<float>(const float*, const float*, const float*, float*, float*, const int32_t*,
                                       int64_t, const AttentionShape&, float);
template void attention_forward<double>(const double*, const double*, const double*, double*, double*,
                                        const int32_t*, int64_t, const AttentionShape&, double);
template void attention_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                        const float*, float*, float*, float*, const int32_t*, int64_t,
                                        const AttentionShape&, float);
template void attention_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                         const double*, double*, double*, double*, const int32_t*, int64_t,
                                         const AttentionShape&, double);

}  // namespace pgolf::cpu
