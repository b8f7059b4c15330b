#include "eval/ttt_lora.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "dist/communicator.h"
#include "eval/documents.h"

namespace pgolf {

LoraTttOptions LoraTttOptions::from_config(const Config& c, int bos_id, bool phased) {
  LoraTttOptions o;
  o.lora.rank = static_cast<int>(c.get_int("ttt_lora_rank"));
  o.lora.targets = {c.get_bool("ttt_q_lora"),   c.get_bool("ttt_k_lora"),   c.get_bool("ttt_v_lora"),
                    c.get_bool("ttt_o_lora"),   c.get_bool("ttt_mlp_lora"), c.get_bool("ttt_head_lora")};
  o.optimizer.lr = c.get_double("ttt_lora_lr");
  o.optimizer.beta1 = c.get_double("ttt_beta1");
  o.optimizer.beta2 = c.get_double("ttt_beta2");
  o.optimizer.eps = c.get_double("ttt_lora_eps");
  o.optimizer.weight_decay = c.get_double("ttt_weight_decay");
  o.chunk = c.get_int("ttt_chunk_size");
  o.context = c.get_int("ttt_eval_seq_len");
  o.batch_size = c.get_int("ttt_batch_size");
  o.batch_cut = parse_batch_cut(c.get_string("ttt_batch_cut"));
  o.grad_steps = c.get_int("ttt_grad_steps");
  o.max_seconds = c.get_double("ttt_max_seconds");
  o.active_rows = c.get_bool("ttt_lora_active_rows");
  o.seed = static_cast<uint64_t>(c.get_int("seed"));
  o.bos_id = bos_id;
  PG_CHECK(o.lora.rank > 0 && o.grad_steps >= 1 && o.chunk > 0 && o.chunk <= o.context && o.batch_size > 0,
           "LoRA TTT: ttt_lora_rank {}, ttt_grad_steps {}, ttt_chunk_size {} (<= ttt_eval_seq_len {}), "
           "ttt_batch_size {}: all must be positive",
           o.lora.rank, o.grad_steps, o.chunk, o.context, o.batch_size);
  if (phased) {
    o.phases = static_cast<int>(c.get_int("phased_ttt_phases"));
    o.prefix_docs = c.get_int("phased_ttt_prefix_docs");
    o.sgd.chunk_tokens = c.get_int("ttt_chunk_tokens");
    o.sgd.seq_len = o.context;
    o.sgd.epochs = c.get_int("ttt_epochs");
    o.sgd.batch_seqs = c.get_int("ttt_batch_seqs");
    o.sgd.optimizer.kind = TttOptimizerConfig::Kind::Sgd;
    o.sgd.optimizer.lr = c.get_double("phased_ttt_lr");
    o.sgd.optimizer.momentum = c.get_double("ttt_momentum");
    o.sgd.optimizer.grad_clip = c.get_double("ttt_grad_clip");
    o.sgd.bos_id = bos_id;
    PG_CHECK(o.phases >= 1 && o.prefix_docs >= 1, "phased TTT: phased_ttt_phases {} and phased_ttt_prefix_docs {} must "
             "be >= 1", o.phases, o.prefix_docs);
  }
  return o;
}

namespace {

// One rank's side of the LoRA queue: scores and adapts batches of documents.
class LoraQueue {
 public:
  LoraQueue(Engine& engine, ScoringLedger& ledger, std::span<const uint16_t> tokens, std::span<const Document> docs,
            const LoraTttOptions& o)
      : engine_(engine), ledger_(ledger), tokens_(tokens), docs_(docs), o_(o) {}
  ~LoraQueue() {
    if (rows_ > 0) engine_.lora_end();
  }

  // Queue batch `index` (documents `ids`): fresh adapters, then score-and-train chunk by chunk.
  void run_batch(int64_t index, std::span<const int64_t> ids);
  double score_seconds = 0.0, train_seconds = 0.0;
  std::vector<BatchTiming> timings;

 private:
  struct Span {
    int64_t row, offset, len, first_target;  // scored positions [offset, offset + len) of a row
  };

  Engine& engine_;
  ScoringLedger& ledger_;
  std::span<const uint16_t> tokens_;
  std::span<const Document> docs_;
  const LoraTttOptions& o_;
  int64_t rows_ = 0;  // rows of the engine's adapters (0 = none yet)
};

void LoraQueue::run_batch(int64_t index, std::span<const int64_t> batch_ids) {
  const int64_t rows = static_cast<int64_t>(batch_ids.size());
  if (rows != rows_) {  // adapters are per row: a batch of another size needs other adapters
    if (rows_ > 0) engine_.lora_end();
    engine_.lora_begin(o_.lora, rows, o_.optimizer);
    rows_ = rows;
  }
  engine_.lora_reset(o_.seed * 1000003ull + static_cast<uint64_t>(index));
  const int64_t C = o_.chunk;
  // Rows in descending order of chunk counts: the documents with a chunk ci are rows [0, active(ci)),
  // and with active_rows only those rows run (row b keeps adapter b, so nothing moves).
  std::vector<int64_t> ids(batch_ids.begin(), batch_ids.end());
  const auto chunks_of = [&](int64_t id) { return num_doc_chunks(docs_[static_cast<size_t>(id)].pred_len(), C); };
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return chunks_of(a) > chunks_of(b); });
  std::vector<int64_t> n_chunks(ids.size());
  for (size_t b = 0; b < ids.size(); ++b) n_chunks[b] = chunks_of(ids[b]);
  const int64_t max_chunks = n_chunks.empty() ? 0 : n_chunks.front();
  Batch batch;
  std::vector<float> nll, weights;
  // A submitted engine call's scored and trained spans: its scores reach the ledger once the next call
  // is submitted (the host builds that batch while the engine works). With several steps per chunk
  // each call is collected at once: the extra steps train on targets the ledger must have scored.
  struct Call {
    std::vector<Span> scored, trained;
    int64_t width = 0, tokens = 0;
  };
  Call calls[2];
  int waiting = -1;  // the call in calls[] whose NLL is not collected yet, or -1
  const auto finish = [&](const Call& c) {
    engine_.collect(nll);
    PG_CHECK(static_cast<int64_t>(nll.size()) == c.tokens, "LoRA TTT: {} losses for a batch of {} tokens", nll.size(),
             c.tokens);
    for (const Span& s : c.scored)
      ledger_.score(s.first_target, std::span<const float>(nll).subspan(static_cast<size_t>(s.row * c.width + s.offset),
                                                                       static_cast<size_t>(s.len)));
    for (const Span& s : c.trained) ledger_.release_local({s.first_target, s.len});
  };
  PG_CHECK(engine_.pending() == 0, "LoRA TTT: the engine has {} uncollected calls", engine_.pending());
  const PendingCalls drain(engine_);
  const auto t_batch = EvalClock::now();
  double extra_seconds = 0.0;
  BatchTiming timing{index, rows, 0, 0, 0.0};
  for (int64_t ci = 0; ci < max_chunks; ++ci) {
    Call& call = calls[ci % 2];
    std::vector<Span>& scored = call.scored;
    std::vector<Span>& trained = call.trained;
    // Width and chunk offset of a full (non-final) chunk ci: the training window of every trained row.
    const ChunkWindow full = doc_chunk_window(ci, (ci + 1) * C, C, o_.context);
    const int64_t width = full.win_len;
    int64_t batch_rows = rows;
    if (o_.active_rows)
      while (batch_rows > 0 && n_chunks[static_cast<size_t>(batch_rows - 1)] <= ci) --batch_rows;
    batch.rows = batch_rows;
    batch.seq_len = width;
    batch.max_seqlen = static_cast<int32_t>(width);
    batch.inputs.assign(static_cast<size_t>(batch_rows * width), 0);
    batch.targets.assign(static_cast<size_t>(batch_rows * width), 0);
    // Every chunk of the call lies in the last C positions of its row (a non-final chunk ends the
    // window; a final one ends at most there): only those positions' losses are read.
    batch.losses_from.assign(static_cast<size_t>(batch_rows), static_cast<int32_t>(width - C));
    scored.clear();
    trained.clear();
    for (int64_t b = 0; b < batch_rows; ++b) {
      if (ci >= n_chunks[static_cast<size_t>(b)]) continue;  // this document is done
      const Document& d = docs_[static_cast<size_t>(ids[static_cast<size_t>(b)])];
      const ChunkWindow w = doc_chunk_window(ci, d.pred_len(), C, o_.context);
      const auto src = tokens_.begin() + d.start + w.win_start;
      std::copy_n(src, w.win_len, batch.inputs.begin() + b * width);
      std::copy_n(src + 1, w.win_len, batch.targets.begin() + b * width);
      const Span s{b, w.chunk_offset, w.chunk_len, d.first_target() + w.win_start + w.chunk_offset};
      PG_CHECK(w.chunk_offset >= width - C && w.chunk_offset + w.chunk_len <= width,
               "LoRA TTT: chunk {}+{} of document {} is outside the last {} positions of a row of {}", w.chunk_offset,
               w.chunk_len, ids[static_cast<size_t>(b)], C, width);
      scored.push_back(s);
      if (ci + 1 < n_chunks[static_cast<size_t>(b)]) {
        PG_CHECK(w.chunk_offset == full.chunk_offset && w.chunk_len == C && w.win_len == width,
                 "LoRA TTT: a non-final chunk of document {} has window {}+{}, expected {}+{}", ids[static_cast<size_t>(b)],
                 w.chunk_offset, w.chunk_len, full.chunk_offset, C);
        trained.push_back(s);
      }
    }
    // Loss = Σ_d mean over d's chunk positions, for the documents with a later chunk: weight 1/C on
    // exactly the positions this forward scores.
    weights.clear();
    if (!trained.empty()) {
      weights.assign(static_cast<size_t>(batch_rows * width), 0.0f);
      for (const Span& s : trained)
        std::fill_n(weights.begin() + s.row * width + s.offset, s.len, 1.0f / static_cast<float>(C));
    }
    call.width = width;
    call.tokens = batch.tokens();
    engine_.submit_lora(batch, weights);
    ++timing.calls;
    timing.tokens += call.tokens;
    if (waiting >= 0) finish(calls[waiting]);
    waiting = static_cast<int>(ci % 2);
    if (o_.grad_steps == 1 || trained.empty()) continue;
    finish(call);
    waiting = -1;
    const auto t1 = EvalClock::now();
    for (int64_t g = 1; g < o_.grad_steps; ++g) {
      for (const Span& s : trained) ledger_.require_trainable({s.first_target, s.len});
      engine_.lora_train_step(batch, weights);
      ++timing.calls;
      timing.tokens += batch.tokens();
    }
    extra_seconds += seconds_since(t1);
  }
  if (waiting >= 0) finish(calls[waiting]);
  train_seconds += extra_seconds;
  timing.seconds = seconds_since(t_batch);
  score_seconds += timing.seconds - extra_seconds;
  timings.push_back(timing);
}

}  // namespace

EvalOutcome evaluate_ttt_lora(Engine& engine, Communicator& comm, std::span<const uint16_t> tokens,
                              const ByteTables& tables, const LoraTttOptions& o, ScoreObserver* observer) {
  const auto t_start = EvalClock::now();
  EvalOutcome out;
  out.mode = o.phases > 0 ? "ttt-phased" : "ttt-lora";
  out.stream_targets = static_cast<int64_t>(tokens.size()) - 1;
  const std::vector<Document> docs = find_documents(tokens, o.bos_id);
  const auto queue = plan_doc_batches(docs, o.batch_size, o.batch_cut);
  const std::vector<PhaseBoundary> phases =
      o.phases > 0 ? plan_phases(o.prefix_docs, o.phases, queue) : std::vector<PhaseBoundary>{};
  ScoringLedger ledger(tokens, tables, ScoringLedger::Policy::ScoreFirst, observer);
  int64_t sgd_steps = 0, phases_done = 0;
  bool capped = false;  // this rank stopped taking batches at the wall-clock cap
  {
    LoraQueue lora(engine, ledger, tokens, docs, o);
    comm.reset_counter(0);
    for (size_t k = 0;; ++k) {
      // Score the queue up to the next phase boundary (or its end): batches from the shared counter.
      const int64_t segment_end = k < phases.size() ? phases[k].batches : static_cast<int64_t>(queue.size());
      while (!(capped = o.max_seconds > 0 && seconds_since(t_start) >= o.max_seconds)) {
        const int64_t index = comm.fetch_add(1);
        if (index >= segment_end) break;
        lora.run_batch(index, queue[static_cast<size_t>(index)]);
      }
      if (k == phases.size()) break;
      double stop = capped ? 1.0 : 0.0;  // every rank takes the same decision
      comm.all_reduce_host(&stop, 1, ReduceOp::Max);
      if (stop > 0) break;
      const auto t0 = EvalClock::now();
      std::vector<Document> prefix;
      for (const auto& batch : queue)
        for (int64_t id : batch)
          if (static_cast<int64_t>(prefix.size()) < phases[k].docs) prefix.push_back(docs[static_cast<size_t>(id)]);
      sgd_steps += global_sgd_phase(engine, comm, ledger, tokens, prefix, o.sgd);
      ++phases_done;
      out.train_seconds += seconds_since(t0);
      comm.reset_counter(segment_end);
    }
    out.score_seconds = lora.score_seconds;
    out.train_seconds += lora.train_seconds;
    out.batches = std::move(lora.timings);
  }
  out.sums = ledger.global_sums(comm);
  out.complete = out.tokens() == out.stream_targets;
  out.note = fmt::format("docs:{} batches:{} rank:{} chunk:{} context:{} steps_per_chunk:{} (score time includes each "
                         "chunk's first adapter step: one engine call)",
                         docs.size(), queue.size(), o.lora.rank, o.chunk, o.context, o.grad_steps);
  if (o.phases > 0)
    out.note += fmt::format(" phases:{}/{} prefix_docs:{} sgd_steps:{}", phases_done, o.phases, o.prefix_docs, sgd_steps);
  if (!out.complete)
    out.note += fmt::format(" INCOMPLETE: ttt_max_seconds {} reached, {} targets unscored", o.max_seconds, out.unscored());
  return out;
}

}  // namespace pgolf
