#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "data/loaders.h"
#include "test_util.h"

using namespace pgolf;

namespace {

constexpr int kBos = 1;

// A shard whose token at position p is base + p (ids stay distinct across shards and positions).
std::filesystem::path counting_shard(const test::TempDir& dir, const std::string& name, int base, int n) {
  std::vector<uint16_t> t(n);
  for (int p = 0; p < n; ++p) t[p] = static_cast<uint16_t>(base + p);
  write_shard(dir / name, t);
  return dir / name;
}

std::vector<int32_t> iota_vec(int32_t from, int n) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = from + i;
  return v;
}

void expect_same(const Batch& a, const Batch& b) {
  EXPECT_EQ(a.inputs, b.inputs);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_EQ(a.rows, b.rows);
  EXPECT_EQ(a.seq_len, b.seq_len);
  EXPECT_EQ(a.cu_seqlens, b.cu_seqlens);
  EXPECT_EQ(a.max_seqlen, b.max_seqlen);
}

// The state through its JSON text, as a checkpoint stores it.
template <typename State>
State json_round_trip(const State& s) {
  return nlohmann::json::parse(nlohmann::json(s).dump()).template get<State>();
}

}  // namespace

TEST(Loaders, LocalBatchTokens) {
  EXPECT_EQ(local_batch_tokens(786432, 8, 1), 98304);
  EXPECT_EQ(local_batch_tokens(524288, 1, 8), 65536);  // one GPU reproduces 8 ranks with 8 micro-steps
  EXPECT_EQ(local_batch_tokens(100, 3, 1), 33);         // rounded down, as the references
  EXPECT_THROW(local_batch_tokens(4, 8, 1), Error);
}

// ---- (a) sequential stream ----------------------------------------------------------------------

TEST(SequentialLoader, RanksTakeTheirSpansOfTheSharedChunk) {
  test::TempDir dir;
  auto s0 = counting_shard(dir, "s0.bin", 1000, 40);
  auto s1 = counting_shard(dir, "s1.bin", 2000, 30);
  // World 2, 16 tokens per step -> n_local 8, span 9, chunk 18; T = 4 -> 2 rows.
  SequentialLoader r0({s0, s1}, 0, 2), r1({s0, s1}, 1, 2);
  Batch a = r0.next(16, 1, 4), b = r1.next(16, 1, 4);
  EXPECT_EQ(a.rows, 2);
  EXPECT_EQ(a.seq_len, 4);
  EXPECT_EQ(a.inputs, iota_vec(1000, 8));  // rank 0: tokens 0..8 of the stream
  EXPECT_EQ(a.targets, iota_vec(1001, 8));
  EXPECT_EQ(b.inputs, iota_vec(1009, 8));  // rank 1: tokens 9..17 (its first token is rank 0's last target)
  EXPECT_EQ(b.targets, iota_vec(1010, 8));
  EXPECT_EQ(a.cu_seqlens, (std::vector<int32_t>{0, 4, 8}));
  EXPECT_EQ(a.max_seqlen, 4);
  EXPECT_EQ(r0.state().pos, 18);
  EXPECT_EQ(r1.state().pos, 18);
}

TEST(SequentialLoader, StreamWrapsOverShards) {
  test::TempDir dir;
  auto s0 = counting_shard(dir, "s0.bin", 1000, 40);
  auto s1 = counting_shard(dir, "s1.bin", 2000, 30);
  // The stream is s0, s1, s0, s1, ... (70 tokens per lap); step k takes chunk [18k, 18k + 18).
  auto stream_at = [](int64_t q) {
    q %= 70;
    return static_cast<int32_t>(q < 40 ? 1000 + q : 2000 + q - 40);
  };
  for (int rank : {0, 1}) {
    SequentialLoader l({s0, s1}, rank, 2);
    for (int step = 0; step < 12; ++step) {  // 216 tokens: three laps and a bit
      Batch b = l.next(16, 1, 4);
      for (int i = 0; i < 8; ++i) {
        const int64_t q = 18 * step + 9 * rank + i;
        ASSERT_EQ(b.inputs[i], stream_at(q)) << "rank " << rank << " step " << step << " i " << i;
        ASSERT_EQ(b.targets[i], stream_at(q + 1)) << "rank " << rank << " step " << step << " i " << i;
      }
    }
  }
  // Step 2 (tokens 36..53) is the first to cross from s0 into s1: pinned by hand.
  SequentialLoader l({s0, s1}, 0, 2);
  l.next(16, 1, 4);
  l.next(16, 1, 4);
  Batch c = l.next(16, 1, 4);
  EXPECT_EQ(c.inputs, (std::vector<int32_t>{1036, 1037, 1038, 1039, 2000, 2001, 2002, 2003}));
  EXPECT_EQ(c.targets, (std::vector<int32_t>{1037, 1038, 1039, 2000, 2001, 2002, 2003, 2004}));
}

TEST(SequentialLoader, GradientAccumulationSplitsTheBatch) {
  test::TempDir dir;
  auto s0 = counting_shard(dir, "s0.bin", 1000, 500);
  SequentialLoader l({s0}, 0, 1);
  // 32 tokens, 1 rank, 4 micro-steps: n_local 8, each micro-step reads 9 tokens.
  Batch m0 = l.next(32, 4, 4), m1 = l.next(32, 4, 4);
  EXPECT_EQ(m0.inputs, iota_vec(1000, 8));
  EXPECT_EQ(m1.inputs, iota_vec(1009, 8));
  EXPECT_THROW(l.next(32, 4, 3), Error);  // 8 tokens are not rows of 3
}

TEST(SequentialLoader, SavedStateContinuesIdentically) {
  test::TempDir dir;
  auto s0 = counting_shard(dir, "s0.bin", 1000, 40);
  auto s1 = counting_shard(dir, "s1.bin", 2000, 30);
  SequentialLoader a({s0, s1}, 1, 2);
  for (int i = 0; i < 5; ++i) a.next(16, 1, 4);
  StreamState saved = json_round_trip(a.state());
  EXPECT_EQ(saved.shard, a.state().shard);
  EXPECT_EQ(saved.pos, a.state().pos);
  SequentialLoader b({s0, s1}, 1, 2);
  b.restore(saved);
  for (int i = 0; i < 10; ++i) expect_same(a.next(16, 1, 4), b.next(16, 1, 4));
  EXPECT_THROW(b.restore({5, 0}), Error);
  EXPECT_THROW(b.restore({0, 41}), Error);
}

// ---- (b) document packing ----------------------------------------------------------------------

TEST(DocSegments, BosStartsCutsAndPadding) {
  // Documents [0,5), [5,20), [20,30) cut every 8 tokens.
  std::vector<int64_t> bos = {0, 5, 20};
  DocSegments s = doc_segments(bos, 30, 8);
  ASSERT_EQ(s.cu_seqlens.size(), 64u);
  std::vector<int32_t> head(s.cu_seqlens.begin(), s.cu_seqlens.begin() + 6);
  EXPECT_EQ(head, (std::vector<int32_t>{0, 5, 13, 20, 28, 30}));
  for (size_t i = 6; i < 64; ++i) EXPECT_EQ(s.cu_seqlens[i], 30) << i;  // zero-length padding segments
  EXPECT_EQ(s.max_seqlen, 8);
}

TEST(DocSegments, BufferNotStartingWithBosGetsASegmentAtZero) {
  std::vector<int64_t> bos = {3, 7};
  DocSegments s = doc_segments(bos, 10, 0, 4);
  EXPECT_EQ(s.cu_seqlens, (std::vector<int32_t>{0, 3, 7, 10}));
  EXPECT_EQ(s.max_seqlen, 4);  // [3, 7)
  // No BOS at all: one document from 0, cut every 4.
  DocSegments none = doc_segments({}, 10, 4, 4);
  EXPECT_EQ(none.cu_seqlens, (std::vector<int32_t>{0, 4, 8, 10}));
  EXPECT_EQ(none.max_seqlen, 4);
  // A BOS at the last position is a one-token segment; 64 boundaries stay 64 entries.
  std::vector<int64_t> last = {9};
  EXPECT_EQ(doc_segments(last, 10, 0, 4).cu_seqlens, (std::vector<int32_t>{0, 9, 10, 10}));
  std::vector<int64_t> many;
  for (int i = 0; i < 63; ++i) many.push_back(i);
  EXPECT_EQ(doc_segments(many, 63, 0).cu_seqlens.size(), 64u);
  std::vector<int64_t> unsorted = {5, 2};
  EXPECT_THROW(doc_segments(unsorted, 10, 0), Error);
}

namespace {

// Shard A (40 tokens): junk 0..2, then documents at 3, 10, 25, 37. Shard B (30 tokens): documents at 0, 12.
// Non-BOS tokens are 100 + position (A) and 200 + position (B).
struct DocShards {
  test::TempDir dir;
  std::filesystem::path a, b;
  std::vector<uint16_t> ta, tb;
  DocShards() {
    ta.resize(40);
    for (int p = 0; p < 40; ++p) ta[p] = static_cast<uint16_t>(100 + p);
    for (int p : {3, 10, 25, 37}) ta[p] = kBos;
    tb.resize(30);
    for (int p = 0; p < 30; ++p) tb[p] = static_cast<uint16_t>(200 + p);
    for (int p : {0, 12}) tb[p] = kBos;
    a = dir / "a.bin";
    b = dir / "b.bin";
    write_shard(a, ta);
    write_shard(b, tb);
  }
  std::vector<int32_t> slice(const std::vector<uint16_t>& t, int from, int n) const {
    return std::vector<int32_t>(t.begin() + from, t.begin() + from + n);
  }
};

}  // namespace

TEST(DocPackingLoader, SpansStartAtFirstBosAndSkipShardTails) {
  DocShards d;
  // World 2, 16 tokens -> n_local 8, span 9, global span 18; documents cut every 4 tokens.
  DocPackingLoader r0({d.a, d.b}, kBos, 0, 2), r1({d.a, d.b}, kBos, 1, 2);
  EXPECT_EQ(r0.state().cursor, 3);  // the first BOS of shard A
  // Step 1: cursor 3. Rank 0 reads A[3..12), rank 1 A[12..21).
  Batch a0 = r0.next(16, 1, 4), a1 = r1.next(16, 1, 4);
  EXPECT_EQ(a0.rows, 1);
  EXPECT_EQ(a0.seq_len, 8);
  EXPECT_EQ(a0.inputs, d.slice(d.ta, 3, 8));
  EXPECT_EQ(a0.targets, d.slice(d.ta, 4, 8));
  EXPECT_EQ(a1.inputs, d.slice(d.ta, 12, 8));
  // Rank 0: BOS at buffer positions 0 and 7 -> [0,4) [4,7) [7,8).
  EXPECT_EQ(std::vector<int32_t>(a0.cu_seqlens.begin(), a0.cu_seqlens.begin() + 4), (std::vector<int32_t>{0, 4, 7, 8}));
  EXPECT_EQ(a0.cu_seqlens.size(), 64u);
  EXPECT_EQ(a0.max_seqlen, 4);
  // Rank 1: no BOS in A[12..20) -> a segment from 0, cut at 4.
  EXPECT_EQ(std::vector<int32_t>(a1.cu_seqlens.begin(), a1.cu_seqlens.begin() + 3), (std::vector<int32_t>{0, 4, 8}));
  // Step 2: cursor 21, 21 + 18 = 39 <= 40 fits. Rank 0 reads A[21..30): BOS at 25 -> buffer 4.
  Batch b0 = r0.next(16, 1, 4);
  r1.next(16, 1, 4);
  EXPECT_EQ(b0.inputs, d.slice(d.ta, 21, 8));
  EXPECT_EQ(std::vector<int32_t>(b0.cu_seqlens.begin(), b0.cu_seqlens.begin() + 3), (std::vector<int32_t>{0, 4, 8}));
  // Step 3: cursor 39 + 18 > 40: the rest of A is skipped; shard B from its first BOS (0).
  Batch c0 = r0.next(16, 1, 4), c1 = r1.next(16, 1, 4);
  EXPECT_EQ(c0.inputs, d.slice(d.tb, 0, 8));
  EXPECT_EQ(c1.inputs, d.slice(d.tb, 9, 8));
  EXPECT_EQ(c1.targets, d.slice(d.tb, 10, 8));
  // Rank 1's buffer B[9..17) has the BOS at 12 -> buffer position 3.
  EXPECT_EQ(std::vector<int32_t>(c1.cu_seqlens.begin(), c1.cu_seqlens.begin() + 4), (std::vector<int32_t>{0, 3, 7, 8}));
  EXPECT_EQ(r0.state().shard, 1);
  EXPECT_EQ(r0.state().cursor, 18);
  // Step 4: 18 + 18 > 30: wrap to shard A at its first BOS.
  Batch e0 = r0.next(16, 1, 4);
  EXPECT_EQ(e0.inputs, d.slice(d.ta, 3, 8));
  EXPECT_EQ(r0.state().shard, 0);
}

TEST(DocPackingLoader, SavedStateContinuesIdentically) {
  DocShards d;
  DocPackingLoader a({d.a, d.b}, kBos, 1, 2);
  for (int i = 0; i < 3; ++i) a.next(16, 1, 4);
  DocPackingLoader b({d.a, d.b}, kBos, 1, 2);
  b.restore(json_round_trip(a.state()));
  for (int i = 0; i < 10; ++i) expect_same(a.next(16, 1, 4), b.next(16, 1, 4));
}

TEST(DocPackingLoader, ShardWithoutBosOrTooSmallIsAnError) {
  test::TempDir dir;
  auto nobos = counting_shard(dir, "nobos.bin", 100, 50);
  try {
    DocPackingLoader l({nobos}, kBos, 0, 1);
    FAIL() << "a shard without BOS was accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("nobos.bin"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("no BOS"));
  }
  DocShards d;
  DocPackingLoader l({d.a, d.b}, kBos, 0, 2);
  EXPECT_THROW(l.next(64, 1, 4), Error);  // a global span of 66 tokens fits no shard
}

// ---- (c) shuffled sequences --------------------------------------------------------------------

namespace {

// Token ids encode (shard, position): shard s position p is 1000 s + p.
struct ShuffleShards {
  test::TempDir dir;
  std::vector<std::filesystem::path> files;
  ShuffleShards() {
    files.push_back(counting_shard(dir, "c0.bin", 0, 50));
    files.push_back(counting_shard(dir, "c1.bin", 1000, 30));
    files.push_back(counting_shard(dir, "c2.bin", 2000, 41));
  }
};

}  // namespace

TEST(ShuffledSequenceLoader, AnEpochServesEveryWindowOfTheOwnedShardsOnce) {
  ShuffleShards d;
  const int T = 8;
  // Rank 0 of 2 owns c0 and c2. One sequence per batch (batch 16 = 2 ranks x 8).
  ShuffledSequenceLoader l(d.files, 0, 2, T, 42);
  std::map<int, std::set<int>> starts;  // shard -> window starts served
  // c0: 50 tokens, phase in [0, 7], (49 - phase) / 8 windows; c2: 41 tokens, (40 - phase) / 8 windows.
  int served = 0;
  for (;; ++served) {
    Batch b = l.next(16, 1);
    if (served > 0 && l.state().drawn == 1) break;  // the first sequence of the next epoch
    ASSERT_LT(served, 100) << "no epoch end";
    ASSERT_EQ(b.rows, 1);
    ASSERT_EQ(b.cu_seqlens, (std::vector<int32_t>{0, T}));
    const int shard = b.inputs[0] / 1000, start = b.inputs[0] % 1000;
    ASSERT_TRUE(shard == 0 || shard == 2) << "rank 0 read shard " << shard;
    for (int i = 0; i < T; ++i) {
      ASSERT_EQ(b.inputs[i], 1000 * shard + start + i);  // a contiguous window
      ASSERT_EQ(b.targets[i], 1000 * shard + start + i + 1);
    }
    ASSERT_TRUE(starts[shard].insert(start).second) << "window " << start << " of shard " << shard << " served twice";
  }
  for (auto [shard, n] : {std::pair{0, 50}, std::pair{2, 41}}) {
    const auto& s = starts[shard];
    const int phase = *s.begin();
    EXPECT_LE(phase, T - 1);
    EXPECT_EQ(static_cast<int>(s.size()), (n - 1 - phase) / T) << "shard " << shard;
    int k = 0;
    for (int start : s) EXPECT_EQ(start, phase + T * k++);
  }
  EXPECT_EQ(served, static_cast<int>(starts[0].size() + starts[2].size()));
}

TEST(ShuffledSequenceLoader, DeterministicPerSeedAndRank) {
  ShuffleShards d;
  auto run = [&](int rank, uint64_t seed) {
    ShuffledSequenceLoader l(d.files, rank, 2, 4, seed);
    std::vector<int32_t> firsts;
    for (int i = 0; i < 6; ++i) {
      Batch b = l.next(16, 1);  // 2 rows of 4
      EXPECT_EQ(b.rows, 2);
      firsts.push_back(b.inputs[0]);
      firsts.push_back(b.inputs[4]);
    }
    return firsts;
  };
  EXPECT_EQ(run(0, 7), run(0, 7));
  EXPECT_NE(run(0, 7), run(0, 8));
  for (int32_t t : run(1, 7)) EXPECT_EQ(t / 1000, 1);  // rank 1 owns only c1
}

TEST(ShuffledSequenceLoader, SavedStateContinuesIdenticallyAcrossEpochs) {
  ShuffleShards d;
  ShuffledSequenceLoader a(d.files, 0, 2, 8, 3);
  for (int i = 0; i < 5; ++i) a.next(16, 1);  // mid-epoch (an epoch holds about 10 windows)
  ShuffledSequenceLoader b(d.files, 0, 2, 8, 99);  // a different seed: everything comes from the state
  b.restore(json_round_trip(a.state()));
  EXPECT_EQ(b.state().drawn, 5);
  for (int i = 0; i < 30; ++i) expect_same(a.next(16, 1), b.next(16, 1));  // through several new epochs
}

TEST(ShuffledSequenceLoader, RankWithoutShardsIsAnError) {
  ShuffleShards d;
  EXPECT_THROW(ShuffledSequenceLoader(d.files, 3, 4, 8, 0), Error);
}
