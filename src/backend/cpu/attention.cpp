#include "backend/cpu/attention.h"
#include "backend/cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

template <typename T>
T dot(const T* a, const T* b, int n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Copies the rows [begin, end) of one KV head into a contiguous [len, Dh] block.
template <typename T>
void gather_head(const T* src, int64_t begin, int64_t end, int kv_heads, int g, int Dh, T* dst) {
  for (int64_t j = begin; j < end; ++j)
    std::copy_n(src + (j * kv_heads + g) * Dh, Dh, dst + (j - begin) * Dh);
}

}  // namespace

template <typename T>
void attention_forward(const T* q, const T* k, const T* v, T* y, T* lse, const int32_t* cu, int64_t num_segments,
                       const AttentionShape& s, T scale) {
  check_cu_seqlens(cu, num_segments, s.tokens);
  const int H = s.heads, Hkv = s.kv_heads, Dh = s.head_dim, group = H / Hkv;
  PG_CHECK(Hkv > 0 && H % Hkv == 0, "attention: {} heads are not a multiple of {} KV heads", H, Hkv);
  // One work item per (segment, KV head): the KV rows are gathered once and serve the whole group.
  const int64_t items = num_segments * Hkv;
#pragma omp parallel if (items > 1 && parallel_worth(s.tokens * s.heads * s.head_dim))
  {
    std::vector<T> kb, vb, p;
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t seg = it / Hkv;
      const int g = static_cast<int>(it % Hkv);
      const int64_t b = cu[seg], e = cu[seg + 1], len = e - b;
      if (len == 0) continue;
      kb.resize(static_cast<size_t>(len * Dh));
      vb.resize(kb.size());
      p.resize(static_cast<size_t>(len));
      gather_head(k, b, e, Hkv, g, Dh, kb.data());
      gather_head(v, b, e, Hkv, g, Dh, vb.data());
      for (int hq = 0; hq < group; ++hq) {
        const int h = g * group + hq;
        for (int64_t i = 0; i < len; ++i) {
          const T* qi = q + ((b + i) * H + h) * Dh;
          T mx = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j <= i; ++j) {
            p[j] = dot(qi, kb.data() + j * Dh, Dh) * scale;
            mx = std::max(mx, p[j]);
          }
          T sum = 0;
          for (int64_t j = 0; j <= i; ++j) {
            p[j] = std::exp(p[j] - mx);
            sum += p[j];
          }
          T* yi = y + ((b + i) * H + h) * Dh;
          std::fill_n(yi, Dh, T(0));
          const T inv = T(1) / sum;
          for (int64_t j = 0; j <= i; ++j) {
            const T w = p[j] * inv;
            const T* vj = vb.data() + j * Dh;
#pragma omp simd
            for (int d = 0; d < Dh; ++d) yi[d] += w * vj[d];
          }
          lse[(b + i) * H + h] = mx + std::log(sum);
        }
      }
    }
  }
}

// With P_ij = exp(S_ij - lse_i), S = scale·q·k:  dV_j += Σ_i P_ij dy_i;  dP_ij = dy_i·v_j;
// dS_ij = P_ij (dP_ij - D_i) with D_i = dy_i·y_i;  dq_i += scale Σ_j dS_ij k_j;  dk_j += scale Σ_i dS_ij q_i.
template <typename T>
void attention_backward(const T* dy, const T* q, const T* k, const T* v, const T* y, const T* lse, T* dq, T* dk,
                        T* dv, const int32_t* cu, int64_t num_segments, const AttentionShape& s, T scale) {
  check_cu_seqlens(cu, num_segments, s.tokens);
  const int H = s.heads, Hkv = s.kv_heads, Dh = s.head_dim, group = H / Hkv;
  // Work items own (segment, KV head): dk/dv rows of one KV head in one segment are written by one
  // thread only, and so are the dq rows of the group's query heads.
  const int64_t items = num_segments * Hkv;
#pragma omp parallel if (items > 1 && parallel_worth(s.tokens * s.heads * s.head_dim))
  {
    std::vector<T> kb, vb, dkb, dvb;
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t seg = it / Hkv;
      const int g = static_cast<int>(it % Hkv);
      const int64_t b = cu[seg], e = cu[seg + 1], len = e - b;
      if (len == 0) continue;
      kb.resize(static_cast<size_t>(len * Dh));
      vb.resize(kb.size());
      dkb.assign(kb.size(), T(0));
      dvb.assign(kb.size(), T(0));
      gather_head(k, b, e, Hkv, g, Dh, kb.data());
      gather_head(v, b, e, Hkv, g, Dh, vb.data());
      for (int hq = 0; hq < group; ++hq) {
        const int h = g * group + hq;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t row = (b + i) * H + h;
          const T* qi = q + row * Dh;
          const T* dyi = dy + row * Dh;
          const T Di = dot(dyi, y + row * Dh, Dh);
          const T li = lse[row];
          T* dqi = dq + row * Dh;
          for (int64_t j = 0; j <= i; ++j) {
            const T* kj = kb.data() + j * Dh;
            const T* vj = vb.data() + j * Dh;
            const T pij = std::exp(dot(qi, kj, Dh) * scale - li);
            const T ds = pij * (dot(dyi, vj, Dh) - Di) * scale;
            T* dkj = dkb.data() + j * Dh;
            T* dvj = dvb.data() + j * Dh;
#pragma omp simd
            for (int d = 0; d < Dh; ++d) {
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
              dvj[d] += pij * dyi[d];
            }
          }
        }
      }
      for (int64_t j = 0; j < len; ++j)
        for (int d = 0; d < Dh; ++d) {
          dk[((b + j) * Hkv + g) * Dh + d] += dkb[j * Dh + d];
          dv[((b + j) * Hkv + g) * Dh + d] += dvb[j * Dh + d];
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
