// The rendezvous store across processes (fork): values, barriers, counter tickets, and the errors of
// timeouts, dead ranks, a vanished server and bad joins.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <sstream>

#include "core/error.h"
#include "dist/rendezvous.h"
#include "dist/tcp_store.h"
#include "dist_test_util.h"

using namespace pgolf;
using test::error_of;
using test::fork_rank;
using test::wait_status;

namespace {

constexpr double kTimeout = 60.0;  // generous: a failing test ends by a dead-rank error long before

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// What every rank of the store test does: publish a value, read everyone's after a barrier, draw
// 50 counter tickets and publish them.
void store_rank(TcpStore& s) {
  const int world = s.world_size();
  s.set("value/" + std::to_string(s.rank()), std::string(100 * s.rank(), 'v') + std::to_string(s.rank()));
  s.barrier();
  for (int r = 0; r < world; ++r)
    PG_CHECK(s.get("value/" + std::to_string(r)) == std::string(100 * r, 'v') + std::to_string(r),
             "rank {} read a wrong value of rank {}", s.rank(), r);
  std::string tickets;
  for (int k = 0; k < 50; ++k) tickets += std::to_string(s.add("ticket", 1)) + " ";
  s.set("tickets/" + std::to_string(s.rank()), tickets);
  s.barrier();
}

}  // namespace

TEST(TcpStore, ValuesBarrierAndUniqueTicketsAcrossProcesses) {
  constexpr int kWorld = 4;
  const int port = find_free_tcp_port();
  std::vector<pid_t> kids;
  for (int r = 1; r < kWorld; ++r)
    kids.push_back(fork_rank([=] {
      TcpStore s("127.0.0.1", port, r, kWorld, kTimeout);
      store_rank(s);
    }));
  {
    TcpStore s("127.0.0.1", port, 0, kWorld, kTimeout);
    EXPECT_EQ(s.port(), port);
    store_rank(s);
    std::vector<int64_t> all;
    for (int r = 0; r < kWorld; ++r) {
      std::istringstream in(s.get("tickets/" + std::to_string(r)));
      for (int64_t t; in >> t;) all.push_back(t);
    }
    std::sort(all.begin(), all.end());
    ASSERT_EQ(all.size(), 50u * kWorld);
    // add() returns the new value: tickets 1 .. 200, each once.
    for (size_t k = 0; k < all.size(); ++k) EXPECT_EQ(all[k], static_cast<int64_t>(k) + 1);
  }
  for (pid_t pid : kids) EXPECT_EQ(wait_status(pid), 0);
}

TEST(TcpStore, WaitTimesOutNamingTheKey) {
  TcpStore s("127.0.0.1", 0, 0, 1, 0.3);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_of([&] { s.get("never/set"); });
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(contains(e, "waiting for 'never/set' timed out after 0.3 s")) << e;
  EXPECT_GE(waited, 0.29);
  EXPECT_LT(waited, 5.0);
  // The connection's state is unknown after a timeout: later requests say so instead of misreading.
  const std::string again = error_of([&] { s.set("k", "v"); });
  EXPECT_TRUE(contains(again, "broke in an earlier request")) << again;
}

TEST(TcpStore, ConnectingToNoServerTimesOut) {
  const int port = find_free_tcp_port();
  const std::string e = error_of([&] { TcpStore s("127.0.0.1", port, 1, 2, 0.5); });
  EXPECT_TRUE(contains(e, "rank 1: could not reach the rendezvous store at 127.0.0.1:" + std::to_string(port) +
                              " within 0.5 s"))
      << e;
  EXPECT_TRUE(contains(e, "MASTER_ADDR and MASTER_PORT")) << e;
}

// A rank whose process ends without a goodbye fails every wait of the others, naming it.
TEST(TcpStore, DeadRankFailsTheWaitsOfTheOthers) {
  const int port = find_free_tcp_port();
  const pid_t kid = fork_rank([=] {
    TcpStore s("127.0.0.1", port, 1, 2, kTimeout);
    s.set("hello", "from rank 1");
    ::_exit(3);  // as a crash: no destructor, no goodbye
  });
  TcpStore s("127.0.0.1", port, 0, 2, kTimeout);
  EXPECT_EQ(s.get("hello"), "from rank 1");
  const std::string e = error_of([&] { s.get("never/set"); });
  EXPECT_TRUE(contains(e, "rank 0: waiting for 'never/set': rank 1 left the rendezvous store without saying goodbye"))
      << e;
  const std::string check = error_of([&] { s.check_peers(); });
  EXPECT_TRUE(contains(check, "rank 1 left the rendezvous store")) << check;
  EXPECT_EQ(wait_status(kid), 3);
}

// A rank that fails with an exception leaves without a goodbye too.
TEST(TcpStore, RankFailingWithAnExceptionIsReportedAsGone) {
  const int port = find_free_tcp_port();
  const pid_t kid = fork_rank([=] {
    TcpStore s("127.0.0.1", port, 1, 2, kTimeout);
    fail("rank 1 broke");
  });
  TcpStore s("127.0.0.1", port, 0, 2, kTimeout);
  const std::string e = error_of([&] { s.barrier(); });
  EXPECT_TRUE(contains(e, "rank 1 left the rendezvous store without saying goodbye")) << e;
  EXPECT_EQ(wait_status(kid), 1);
}

TEST(TcpStore, VanishedServerFailsTheClients) {
  const int port = find_free_tcp_port();
  const pid_t kid = fork_rank([=] {
    TcpStore s("127.0.0.1", port, 0, 2, kTimeout);
    s.get("go");
    ::_exit(0);  // rank 0 stops serving without waiting for the others
  });
  TcpStore s("127.0.0.1", port, 1, 2, kTimeout);
  s.set("go", "");
  const std::string e = error_of([&] { s.get("never/set"); });
  EXPECT_TRUE(contains(e, "rank 1: waiting for 'never/set': the rendezvous store at 127.0.0.1:" +
                              std::to_string(port) + " closed the connection (rank 0, which serves it, exited"))
      << e;
  EXPECT_EQ(wait_status(kid), 0);
}

TEST(TcpStore, RefusesAWrongWorldSizeAndADuplicateRank) {
  TcpStore s0("127.0.0.1", 0, 0, 2, kTimeout);
  const std::string world = error_of([&] { TcpStore s("127.0.0.1", s0.port(), 1, 3, kTimeout); });
  EXPECT_TRUE(contains(world, "rank 1 says the world size is 3, rank 0 says 2")) << world;
  TcpStore s1("127.0.0.1", s0.port(), 1, 2, kTimeout);
  const std::string twice = error_of([&] { TcpStore s("127.0.0.1", s0.port(), 1, 2, kTimeout); });
  EXPECT_TRUE(contains(twice, "two processes claim rank 1")) << twice;
  // The two real ranks still work together.
  s1.set("k", "v");
  EXPECT_EQ(s0.get("k"), "v");
}

TEST(TcpStore, AddRefusesANonInteger) {
  TcpStore s("127.0.0.1", 0, 0, 1, kTimeout);
  s.set("text", "abc");
  const std::string e = error_of([&] { s.add("text", 1); });
  EXPECT_TRUE(contains(e, "key 'text' holds 3 bytes, not an integer")) << e;
  s.set("count", encode_store_int(-5));
  EXPECT_EQ(s.add("count", 7), 2);
  EXPECT_EQ(decode_store_int(s.get("count"), "count"), 2);
}

// Local ranks come from host names when the launcher does not give them; the counter is shared.
TEST(Rendezvous, LocalRanksFromHostNamesAndASharedCounter) {
  constexpr int kWorld = 3;
  const int port = find_free_tcp_port();
  auto info_of = [&](int r) {
    LaunchInfo info;
    info.rank = r;
    info.world_size = kWorld;
    info.master_addr = "127.0.0.1";
    info.master_port = info.store_port = port;
    info.launcher = "pmi";
    return info;
  };
  auto run = [&](Rendezvous& rv) {
    PG_CHECK(rv.launch().local_rank == rv.rank() && rv.launch().local_world_size == kWorld,
             "rank {}: local rank {} of {}", rv.rank(), rv.launch().local_rank, rv.launch().local_world_size);
    rv.reset_counter(10);
    const int64_t a = rv.fetch_add(2), b = rv.fetch_add(2);
    rv.store().set("got/" + std::to_string(rv.rank()), std::to_string(a) + " " + std::to_string(b));
    rv.barrier();
  };
  std::vector<pid_t> kids;
  for (int r = 1; r < kWorld; ++r)
    kids.push_back(fork_rank([&, r] {
      Rendezvous rv(info_of(r), kTimeout);
      run(rv);
    }));
  Rendezvous rv(info_of(0), kTimeout);
  run(rv);
  std::vector<int64_t> tickets;
  for (int r = 0; r < kWorld; ++r) {
    std::istringstream in(rv.store().get("got/" + std::to_string(r)));
    for (int64_t t; in >> t;) tickets.push_back(t);
  }
  std::sort(tickets.begin(), tickets.end());
  EXPECT_EQ(tickets, (std::vector<int64_t>{10, 12, 14, 16, 18, 20}));
  for (pid_t pid : kids) EXPECT_EQ(wait_status(pid), 0);
}

TEST(Rendezvous, OneProcessServesAPrivateStore) {
  Rendezvous rv(LaunchInfo{}, kTimeout);
  EXPECT_EQ(rv.launch().local_rank, 0);
  EXPECT_EQ(rv.launch().local_world_size, 1);
  EXPECT_GT(rv.store().port(), 0);
  rv.reset_counter(4);
  EXPECT_EQ(rv.fetch_add(3), 4);
  EXPECT_EQ(rv.fetch_add(1), 7);
  EXPECT_EQ(rv.next_key("id"), "id/0");
  EXPECT_EQ(rv.next_key("id"), "id/1");
}

TEST(Rendezvous, TimeoutFromTheEnvironment) {
  {
    test::ScopedEnv env({{"PGOLF_DIST_TIMEOUT", std::nullopt}});
    EXPECT_EQ(dist_timeout_seconds(), 600.0);
  }
  {
    test::ScopedEnv env({{"PGOLF_DIST_TIMEOUT", "12.5"}});
    EXPECT_EQ(dist_timeout_seconds(), 12.5);
  }
  test::ScopedEnv env({{"PGOLF_DIST_TIMEOUT", "soon"}});
  EXPECT_TRUE(contains(error_of([] { dist_timeout_seconds(); }), "PGOLF_DIST_TIMEOUT='soon'"));
}
