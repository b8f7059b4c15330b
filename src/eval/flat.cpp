#include "eval/flat.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "data/loaders.h"
#include "data/shard.h"
#include "dist/communicator.h"
#include "model/engine.h"

namespace pgolf {

int resolve_grad_accum(const Config& c, int world_size) {
  const int64_t configured = c.get_int("grad_accum_steps");
  PG_CHECK(configured >= 0, "grad_accum_steps must be >= 0 (0 = 8 / world size), got {}", configured);
  if (configured > 0) return static_cast<int>(configured);
  PG_CHECK(world_size >= 1 && 8 % world_size == 0,
           "grad_accum_steps = 0 means 8 / world_size, but world size {} does not divide 8; set grad_accum_steps",
           world_size);
  return 8 / world_size;
}

int64_t resolve_eval_seq_len(const Config& c) {
  const int64_t t = std::max(c.get_int("train_seq_len"), c.get_int("eval_seq_len"));
  PG_CHECK(t > 0, "evaluation sequence length {} must be positive (eval_seq_len / train_seq_len)", t);
  return t;
}

std::vector<uint16_t> load_eval_tokens(const std::string& glob, const Config& c) {
  const int64_t seq_len = resolve_eval_seq_len(c);
  std::vector<uint16_t> tokens = load_validation_tokens(find_shards(glob), seq_len, c.get_int("vocab_size"));
  const int64_t max_targets = c.get_int("val_max_tokens");
  PG_CHECK(max_targets >= 0, "val_max_tokens must be >= 0 (0 = all), got {}", max_targets);
  if (max_targets > 0 && max_targets < static_cast<int64_t>(tokens.size()) - 1) {
    const int64_t keep = usable_targets(max_targets + 1, seq_len);
    PG_CHECK(keep > 0, "val_max_tokens {} is less than one evaluation sequence of {} tokens", max_targets, seq_len);
    tokens.resize(static_cast<size_t>(keep + 1));
  }
  return tokens;
}

FlatEvalOptions FlatEvalOptions::from_config(const Config& c, int grad_accum, int bos_id) {
  FlatEvalOptions o;
  o.seq_len = resolve_eval_seq_len(c);
  o.batch_tokens = c.get_int("val_batch_tokens");
  o.grad_accum = grad_accum;
  o.doc_isolated = c.get_bool("val_doc_isolated");
  o.rank_seq_multiple = c.get_int("val_rank_seq_multiple");
  PG_CHECK(o.rank_seq_multiple >= 0, "val_rank_seq_multiple must be >= 0 (0 = off), got {}", o.rank_seq_multiple);
  o.bos_id = bos_id;
  return o;
}

std::pair<int64_t, int64_t> FlatEvalOptions::rank_range(int64_t total_seqs, int rank, int world) const {
  const int64_t begin = total_seqs * rank / world;
  int64_t end = total_seqs * (rank + 1) / world;
  if (rank_seq_multiple > 0) end = begin + (end - begin) / rank_seq_multiple * rank_seq_multiple;
  return {begin, end};
}

void FlatEvalOptions::check_scores_something(std::span<const uint16_t> tokens, int world, const std::string& what) const {
  const int64_t total_seqs = tokens.size() < 2 ? 0 : static_cast<int64_t>(tokens.size() - 1) / seq_len;
  int64_t scored = 0;
  for (int r = 0; r < world; ++r) {
    const auto [begin, end] = rank_range(total_seqs, r, world);
    scored += end - begin;
  }
  PG_CHECK(scored > 0,
           "{}: {} sequences of {} tokens over {} rank(s) leave nothing to score with val_rank_seq_multiple {} "
           "(each rank's share is cut to a multiple of it): give more validation tokens (val_max_tokens) or "
           "set val_rank_seq_multiple = 0",
           what, total_seqs, seq_len, world, rank_seq_multiple);
}

namespace {

// Sequences [first, first + count) of the stream as one batch: dense rows of seq_len, or (document
// isolation) one flat row whose segments start at every BOS and are cut every seq_len tokens.
Batch eval_batch(std::span<const uint16_t> tokens, int64_t first, int64_t count, const FlatEvalOptions& o) {
  const int64_t n = count * o.seq_len;
  const auto span = tokens.subspan(static_cast<size_t>(first * o.seq_len), static_cast<size_t>(n + 1));
  Batch b;
  b.inputs.assign(span.begin(), span.end() - 1);
  b.targets.assign(span.begin() + 1, span.end());
  if (o.doc_isolated) {
    std::vector<int64_t> bos;
    for (int64_t i = 0; i < n; ++i)
      if (b.inputs[static_cast<size_t>(i)] == o.bos_id) bos.push_back(i);
    DocSegments seg = doc_segments(bos, n, o.seq_len);
    b.rows = 1;
    b.seq_len = n;
    b.cu_seqlens = std::move(seg.cu_seqlens);
    b.max_seqlen = seg.max_seqlen;
  } else {
    b.rows = count;
    b.seq_len = o.seq_len;
    for (int64_t r = 0; r <= count; ++r) b.cu_seqlens.push_back(static_cast<int32_t>(r * o.seq_len));
    b.max_seqlen = static_cast<int32_t>(o.seq_len);
  }
  return b;
}

}  // namespace

FlatEvalResult evaluate_flat(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                             const ByteTables& tables, const FlatEvalOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  PG_CHECK(o.seq_len > 0, "flat evaluation: sequence length {} must be positive", o.seq_len);
  PG_CHECK(tokens.size() >= 2 && (tokens.size() - 1) % static_cast<size_t>(o.seq_len) == 0,
           "flat evaluation: {} tokens are not whole sequences of {} + 1 (use load_eval_tokens)", tokens.size(),
           o.seq_len);
  const int world = comm.world_size(), rank = comm.rank();
  const int64_t local_tokens = local_batch_tokens(o.batch_tokens, world, o.grad_accum);
  PG_CHECK(local_tokens >= o.seq_len,
           "flat evaluation: val_batch_tokens {} gives {} tokens per rank and accumulation step, less than one "
           "sequence of {}",
           o.batch_tokens, local_tokens, o.seq_len);
  const int64_t batch_seqs = local_tokens / o.seq_len;
  const int64_t total_seqs = static_cast<int64_t>(tokens.size() - 1) / o.seq_len;
  o.check_scores_something(tokens, world, "flat evaluation");
  const auto [seq_begin, seq_end] = o.rank_range(total_seqs, rank, world);

  BpbAccumulator acc;
  std::vector<float> nll;
  // Batch k is summed once batch k+1 is submitted (the host's work overlaps the engine's).
  Batch batches[2];
  const auto add = [&](const Batch& b) {
    engine.collect(nll);
    PG_CHECK(static_cast<int64_t>(nll.size()) == b.tokens(), "flat evaluation: {} losses for a batch of {} targets",
             nll.size(), b.tokens());
    double loss_sum = 0.0;
    for (float x : nll) loss_sum += static_cast<double>(x);
    const TargetBytes tb = count_target_bytes<int32_t>(tables, b.inputs, b.targets);
    acc.add(loss_sum, static_cast<double>(tb.targets), static_cast<double>(tb.bytes));
  };
  PG_CHECK(engine.pending() == 0, "flat evaluation: the engine has {} uncollected calls", engine.pending());
  const PendingCalls drain(engine);
  int k = 0;
  for (int64_t s = seq_begin; s < seq_end; s += batch_seqs, ++k) {
    Batch& b = batches[k % 2];
    b = eval_batch(tokens, s, std::min(batch_seqs, seq_end - s), o);
    engine.submit_token_losses(b);
    if (k > 0) add(batches[(k - 1) % 2]);
  }
  if (k > 0) add(batches[(k - 1) % 2]);
  double sums[3] = {acc.loss_sum, acc.tokens, acc.bytes};
  comm.all_reduce_host(sums, 3, ReduceOp::Sum);
  BpbAccumulator total;
  total.add(sums[0], sums[1], sums[2]);

  FlatEvalResult r;
  r.val_loss = total.val_loss();
  r.val_bpb = total.val_bpb();
  r.tokens = static_cast<int64_t>(total.tokens);
  r.bytes = static_cast<int64_t>(total.bytes);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace pgolf
