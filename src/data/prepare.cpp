#include "data/prepare.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"
#include "data/text_reader.h"

namespace pgolf {

namespace {

constexpr size_t kBatchTextBytes = 1 << 20;  // a batch of documents holds about this much text
constexpr size_t kBatchMaxDocs = 1024;

struct DocBatch {
  size_t input_index = 0;
  double input_fraction = 0.0;  // of the input file read when the batch was complete
  std::vector<std::string> texts;
  std::vector<std::vector<uint16_t>> tokens;  // per document [BOS] + ids, filled by an encoder
};

// Batches flow reader -> encoders -> writer. Every batch gets a sequence number when it is read;
// encoders finish batches in any order; the writer receives them in sequence order. At most
// `max_in_flight` batches exist at once, which bounds memory. Any failure aborts every stage.
class Pipeline {
 public:
  explicit Pipeline(size_t max_in_flight) : max_in_flight_(max_in_flight) {}

  // Reader: queues a batch; waits while the pipeline is full. False once aborted.
  bool push(DocBatch&& batch) {
    std::unique_lock lock(mutex_);
    space_cv_.wait(lock, [&] { return aborted_ || slots_.size() < max_in_flight_; });
    if (aborted_) return false;
    slots_[pushed_].batch = std::move(batch);
    todo_.push_back(pushed_++);
    work_cv_.notify_one();
    return true;
  }
  void close() {
    std::lock_guard lock(mutex_);
    closed_ = true;
    work_cv_.notify_all();
    done_cv_.notify_all();
  }

  // Encoder: the next batch to encode (the pointer stays valid until finish). False when there is none left.
  bool take(int64_t& seq, DocBatch*& batch) {
    std::unique_lock lock(mutex_);
    work_cv_.wait(lock, [&] { return aborted_ || !todo_.empty() || closed_; });
    if (aborted_ || todo_.empty()) return false;
    seq = todo_.front();
    todo_.erase(todo_.begin());
    batch = &slots_.at(seq).batch;
    return true;
  }
  void finish(int64_t seq) {
    std::lock_guard lock(mutex_);
    slots_.at(seq).encoded = true;
    done_cv_.notify_all();
  }

  // Writer: the next batch in sequence order. False when every batch has been written.
  bool next_encoded(DocBatch& out) {
    std::unique_lock lock(mutex_);
    done_cv_.wait(lock, [&] {
      if (aborted_) return true;
      auto it = slots_.find(written_);
      return (it != slots_.end() && it->second.encoded) || (closed_ && written_ == pushed_);
    });
    if (aborted_ || written_ == pushed_) return false;
    auto it = slots_.find(written_++);
    out = std::move(it->second.batch);
    slots_.erase(it);
    space_cv_.notify_one();
    return true;
  }

  void abort(std::exception_ptr error) {
    std::lock_guard lock(mutex_);
    if (!error_) error_ = error;
    aborted_ = true;
    space_cv_.notify_all();
    work_cv_.notify_all();
    done_cv_.notify_all();
  }
  std::exception_ptr error() const { return error_; }

 private:
  struct Slot {
    DocBatch batch;
    bool encoded = false;
  };
  size_t max_in_flight_;
  std::mutex mutex_;
  std::condition_variable space_cv_, work_cv_, done_cv_;
  std::map<int64_t, Slot> slots_;  // every batch read and not yet written
  std::vector<int64_t> todo_;      // batches waiting for an encoder, oldest first
  int64_t pushed_ = 0, written_ = 0;
  bool closed_ = false, aborted_ = false;
  std::exception_ptr error_;
};

void read_inputs(const std::vector<fs::path>& inputs, Pipeline& pipe) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    TextReader reader(inputs[i]);
    DocBatch batch;
    size_t batch_bytes = 0;
    std::string text;
    auto push = [&] {
      batch.input_index = i;
      batch.input_fraction = reader.file_size() ? double(reader.file_bytes_read()) / double(reader.file_size()) : 1.0;
      bool ok = pipe.push(std::move(batch));
      batch = DocBatch{};
      batch_bytes = 0;
      return ok;
    };
    while (reader.next(text)) {
      batch_bytes += text.size();
      batch.texts.push_back(std::move(text));
      if ((batch_bytes >= kBatchTextBytes || batch.texts.size() >= kBatchMaxDocs) && !push()) return;
    }
    if (!batch.texts.empty() && !push()) return;
  }
}

void encode_batches(const Tokenizer& tok, Pipeline& pipe) {
  int64_t seq;
  DocBatch* batch;
  const auto bos = static_cast<uint16_t>(tok.bos_id());
  while (pipe.take(seq, batch)) {
    batch->tokens.resize(batch->texts.size());
    for (size_t k = 0; k < batch->texts.size(); ++k) {
      std::vector<int> ids = tok.encode(batch->texts[k]);
      auto& out = batch->tokens[k];
      out.reserve(ids.size() + 1);
      out.push_back(bos);
      for (int id : ids) out.push_back(static_cast<uint16_t>(id));  // ids < vocab <= 65,536 (checked up front)
    }
    pipe.finish(seq);
  }
}

// Appends documents to a series of shards of `shard_tokens` tokens, writing each as it fills.
class ShardSeries {
 public:
  ShardSeries(fs::path dir, std::string name, bool heldout, int64_t shard_tokens)
      : dir_(std::move(dir)), name_(std::move(name)), heldout_(heldout), shard_tokens_(shard_tokens) {}

  void append(std::span<const uint16_t> tokens) {
    while (!tokens.empty()) {
      if (buffer_.empty()) buffer_.reserve(static_cast<size_t>(shard_tokens_));
      const size_t take = std::min(tokens.size(), static_cast<size_t>(shard_tokens_) - buffer_.size());
      buffer_.insert(buffer_.end(), tokens.begin(), tokens.begin() + take);
      tokens = tokens.subspan(take);
      if (static_cast<int64_t>(buffer_.size()) == shard_tokens_) flush();
    }
  }

  // Writes the last, partial shard, then removes this series' shards numbered beyond the ones written.
  void finish() {
    if (!buffer_.empty()) flush();
    const std::string prefix = name_ + (heldout_ ? "_heldout_" : "_");
    for (auto& entry : fs::directory_iterator(dir_)) {
      const std::string f = entry.path().filename().string();
      if (!f.starts_with(prefix) || !f.ends_with(".bin")) continue;
      const std::string digits = f.substr(prefix.size(), f.size() - prefix.size() - 4);
      if (digits.size() < 6 || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
        continue;
      if (std::stoll(digits) >= static_cast<int64_t>(written_.size())) fs::remove(entry.path());
    }
  }
  const std::vector<fs::path>& written() const { return written_; }

 private:
  void flush() {
    fs::path path = dir_ / shard_file_name(name_, heldout_, static_cast<int64_t>(written_.size()));
    write_shard(path, buffer_);
    written_.push_back(path);
    buffer_.clear();
  }

  fs::path dir_;
  std::string name_;
  bool heldout_;
  int64_t shard_tokens_;
  std::vector<uint16_t> buffer_;
  std::vector<fs::path> written_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::string shard_file_name(const std::string& name, bool heldout, int64_t index) {
  return fmt::format("{}{}{:06d}.bin", name, heldout ? "_heldout_" : "_", index);
}

PrepareSummary prepare_shards(const PrepareOptions& o, const Tokenizer& tok,
                              const std::function<void(const PrepareProgress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  PG_CHECK(!o.inputs.empty(), "prepare: no input file given");
  PG_CHECK(tok.vocab_size() <= 65536, "prepare: tokenizer {} has {} pieces; shards store uint16 ids (at most 65,536)",
           tok.path().string(), tok.vocab_size());
  PG_CHECK(o.shard_tokens > 0 && o.shard_tokens <= INT32_MAX, "prepare: --shard-tokens {} outside [1, 2^31-1]",
           o.shard_tokens);
  PG_CHECK(o.heldout_docs >= 0, "prepare: --heldout-docs {} is negative", o.heldout_docs);
  PG_CHECK(!o.name.empty() && o.name.find('/') == std::string::npos, "prepare: --name '{}' must be a plain file prefix",
           o.name);
  for (auto& f : o.inputs) PG_CHECK(fs::is_regular_file(f), "prepare: input {} does not exist", f.string());
  fs::create_directories(o.out_dir);

  PrepareSummary summary;
  for (auto& f : o.inputs) summary.inputs.push_back({f, {}});

  // Held-out documents are spread over all inputs, which needs the total document count first.
  int64_t total_docs = 0, heldout_stride = 0;
  if (o.heldout_docs > 0) {
    for (auto& f : o.inputs) total_docs += count_documents(f);
    PG_CHECK(o.heldout_docs < total_docs, "prepare: --heldout-docs {} leaves no training document (inputs hold {})",
             o.heldout_docs, total_docs);
    heldout_stride = total_docs / o.heldout_docs;
  }

  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  Pipeline pipe(static_cast<size_t>(4 * threads));
  auto guarded = [&pipe](auto&& fn) {
    return [&pipe, fn] {
      try {
        fn();
      } catch (...) {
        pipe.abort(std::current_exception());
      }
    };
  };
  std::vector<std::thread> workers;
  workers.emplace_back(guarded([&] {
    read_inputs(o.inputs, pipe);
    pipe.close();
  }));
  for (int t = 0; t < threads; ++t) workers.emplace_back(guarded([&] { encode_batches(tok, pipe); }));

  ShardSeries train(o.out_dir, o.name, false, o.shard_tokens);
  ShardSeries heldout(o.out_dir, o.name, true, o.shard_tokens);
  std::vector<std::vector<uint16_t>> held_back;  // training documents waiting to be shuffled
  guarded([&] {
    DocBatch batch;
    int64_t doc_index = 0;
    while (pipe.next_encoded(batch)) {
      PrepareCounts& in = summary.inputs[batch.input_index].counts;
      for (size_t k = 0; k < batch.tokens.size(); ++k, ++doc_index) {
        auto& toks = batch.tokens[k];
        const auto n = static_cast<int64_t>(toks.size());
        const bool hold = heldout_stride > 0 && doc_index % heldout_stride == 0 &&
                          summary.total.heldout_documents < o.heldout_docs;
        if (hold)
          heldout.append(toks);
        else if (o.shuffle_seed >= 0)
          held_back.push_back(std::move(toks));
        else
          train.append(toks);
        for (PrepareCounts* c : {&in, &summary.total}) {
          c->documents += 1;
          c->tokens += n;
          c->text_bytes += static_cast<int64_t>(batch.texts[k].size());
          c->heldout_documents += hold;
          c->heldout_tokens += hold ? n : 0;
        }
      }
      if (progress) progress({summary.total, batch.input_index, batch.input_fraction, seconds_since(t0)});
    }
  })();
  for (auto& w : workers) w.join();
  if (pipe.error()) std::rethrow_exception(pipe.error());
  PG_CHECK(o.heldout_docs == 0 || summary.total.documents == total_docs,
           "prepare: counted {} documents in the inputs but read {} (did an input change meanwhile?)", total_docs,
           summary.total.documents);

  if (o.shuffle_seed >= 0) {
    Rng rng(static_cast<uint64_t>(o.shuffle_seed));
    for (size_t i = held_back.size(); i > 1; --i) std::swap(held_back[i - 1], held_back[rng.below(i)]);  // Fisher-Yates
    for (auto& doc : held_back) train.append(doc);
  }
  train.finish();
  heldout.finish();
  summary.shards = train.written();
  summary.heldout_shards = heldout.written();
  summary.seconds = seconds_since(t0);
  return summary;
}

}  // namespace pgolf
