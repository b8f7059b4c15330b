// Causal grouped-query attention over variable-length segments (FlashAttention's varlen contract):
// token-major q [N, H, Dh], k and v [N, Hkv, Dh]; query head h reads KV head h / (H / Hkv); token i
// attends to tokens j ≤ i of its own segment [cu[s], cu[s+1]). Softmax scale 1/sqrt(Dh) unless given.
// Exact O(len²) per segment and head, as blocks of GEMMs over query rows; the forward saves the
// log-sum-exp per (token, head) and the backward recomputes the probabilities from it (no
// [len, len] tensor is kept between the calls).
#pragma once

#include <cstdint>

namespace pgolf::cpu {

struct AttentionShape {
  int64_t tokens = 0;  // N
  int heads = 0;       // H
  int kv_heads = 0;    // Hkv, divides H
  int head_dim = 0;    // Dh
};

// cu_seqlens[num_segments + 1]: non-decreasing, cu[0] = 0, cu[num_segments] = N (empty segments
// allowed, as in the references' padded cu_seqlens). y [N, H, Dh], lse [N, H].
template <typename T>
void attention_forward(const T* q, const T* k, const T* v, T* y, T* lse, const int32_t* cu_seqlens,
                       int64_t num_segments, const AttentionShape& shape, T scale);

// dq [N,H,Dh], dk and dv [N,Hkv,Dh] are accumulated (+=) from dy, using the forward's y and lse.
template <typename T>
void attention_backward(const T* dy, const T* q, const T* k, const T* v, const T* y, const T* lse, T* dq, T* dk,
                        T* dv, const int32_t* cu_seqlens, int64_t num_segments, const AttentionShape& shape, T scale);

// Checks a cu_seqlens array against N (throws naming the offending entry).
void check_cu_seqlens(const int32_t* cu_seqlens, int64_t num_segments, int64_t tokens);

}  // namespace pgolf::cpu
