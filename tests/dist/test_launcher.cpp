// The local launcher with shell ranks: environment, output relay, failure propagation, the grace
// period, signal forwarding.
#include <fmt/core.h>
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <mutex>

#include "dist/launcher.h"
#include "dist_test_util.h"
#include "test_util.h"

using namespace pgolf;

namespace {

struct Line {
  int rank;
  OutputStream stream;
  std::string text;
};

// Runs `script` with /bin/sh in `nproc` ranks and records every line.
struct ShellLaunch {
  std::vector<Line> lines;
  int status = -1;
  double seconds = 0.0;

  ShellLaunch(const std::string& script, int nproc, double grace_seconds = 10.0,
              const std::function<void(const Line&)>& on_line = {}) {
    LocalLaunch launch;
    launch.executable = "/bin/sh";
    launch.args = {"sh", "-c", script};
    launch.nproc = nproc;
    launch.grace_seconds = grace_seconds;
    const auto t0 = std::chrono::steady_clock::now();
    status = run_local_ranks(launch, [&](int rank, OutputStream stream, std::string_view text) {
      lines.push_back({rank, stream, std::string(text)});
      if (on_line) on_line(lines.back());
    });
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  bool has(int rank, OutputStream stream, const std::string& text) const {
    for (const Line& l : lines)
      if (l.rank == rank && l.stream == stream && l.text == text) return true;
    return false;
  }
  bool note_contains(const std::string& part) const {
    for (const Line& l : lines)
      if (l.rank == -1 && l.text.find(part) != std::string::npos) return true;
    return false;
  }
  std::string dump() const {
    std::string out;
    for (const Line& l : lines) out += fmt::format("[{}] {}\n", l.rank, l.text);
    return out;
  }
};

// --json under --nproc: rank 0's standard output is the document, unprefixed; the other ranks' output
// and every standard-error line go to standard error.
TEST(Launcher, Rank0DocumentSinkKeepsTheDocumentClean) {
  std::vector<std::string> document;
  std::vector<Line> others;
  const LineSink sink = rank0_document_sink([&](std::string_view line) { document.emplace_back(line); },
                                            [&](int rank, OutputStream stream, std::string_view line) {
                                              others.push_back({rank, stream, std::string(line)});
                                            });
  sink(0, OutputStream::Out, "{\"a\": 1}");
  sink(1, OutputStream::Out, "{\"b\": 2}");
  sink(0, OutputStream::Err, "warning");
  sink(-1, OutputStream::Err, "launcher note");
  ASSERT_EQ(document, std::vector<std::string>{"{\"a\": 1}"});
  ASSERT_EQ(others.size(), 3u);
  EXPECT_EQ(others[0].rank, 1);
  EXPECT_EQ(others[0].text, "{\"b\": 2}");
  for (const Line& l : others) EXPECT_EQ(l.stream, OutputStream::Err) << l.text;
}

}  // namespace

TEST(Launcher, EveryRankGetsTorchrunsVariablesAndItsOutputIsRelayed) {
  test::ScopedEnv env({{"NCCL_NVLS_ENABLE", std::nullopt}, {"NVSHMEM_DISABLE_NVLS", "7"}, {"RANK", "99"}});
  const ShellLaunch run(
      "echo \"out $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE at $MASTER_ADDR\"; "
      "echo \"err $RANK nvls=$NCCL_NVLS_ENABLE shmem=$NVSHMEM_DISABLE_NVLS mc=$TORCH_SYMM_MEM_DISABLE_MULTICAST\" >&2; "
      "echo \"port $MASTER_PORT\"; printf 'no newline %s' $RANK",
      3);
  EXPECT_EQ(run.status, 0) << run.dump();
  std::string port;
  for (int r = 0; r < 3; ++r) {
    const std::string n = std::to_string(r);
    EXPECT_TRUE(run.has(r, OutputStream::Out, "out " + n + "/3 local " + n + "/3 at 127.0.0.1")) << run.dump();
    // The multicast switches are set where the user has not set them; a user's value stays.
    EXPECT_TRUE(run.has(r, OutputStream::Err, "err " + n + " nvls=0 shmem=7 mc=1")) << run.dump();
    EXPECT_TRUE(run.has(r, OutputStream::Out, "no newline " + n)) << run.dump();
    for (const Line& l : run.lines)
      if (l.rank == r && l.text.rfind("port ", 0) == 0) {
        if (port.empty()) port = l.text;
        EXPECT_EQ(l.text, port);  // one store for all ranks
      }
  }
  EXPECT_GT(std::stoi(port.substr(5)), 0);
}

TEST(Launcher, OneFailingRankStopsTheOthersAndGivesItsStatus) {
  const ShellLaunch run("if [ \"$RANK\" = 1 ]; then echo boom >&2; exit 3; fi; exec sleep 60", 3);
  EXPECT_EQ(run.status, 3) << run.dump();
  EXPECT_TRUE(run.has(1, OutputStream::Err, "boom")) << run.dump();
  EXPECT_TRUE(run.note_contains("rank 1 (pid ")) << run.dump();
  EXPECT_TRUE(run.note_contains("exited with status 3; stopping the other ranks")) << run.dump();
  EXPECT_LT(run.seconds, 30.0);  // the sleepers were stopped, not waited for
}

TEST(Launcher, ARankEndedByASignalIsAFailure) {
  const ShellLaunch run("if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; exec sleep 60", 2);
  EXPECT_EQ(run.status, 128 + 9) << run.dump();
  EXPECT_TRUE(run.note_contains("rank 0 (pid ")) << run.dump();
  EXPECT_TRUE(run.note_contains("was ended by signal 9")) << run.dump();
}

TEST(Launcher, RanksIgnoringSigtermAreKilledAfterTheGracePeriod) {
  // Rank 1 fails once rank 0 ignores SIGTERM (a file says so).
  test::TempDir dir;
  const std::string flag = (dir / "ignoring").string();
  const ShellLaunch run("if [ \"$RANK\" = 1 ]; then while [ ! -e '" + flag + "' ]; do sleep 0.01; done; exit 5; fi; "
                        "trap '' TERM; touch '" + flag + "'; sleep 60",
                        2, 0.5);
  EXPECT_EQ(run.status, 5) << run.dump();
  EXPECT_TRUE(run.note_contains("rank 0 (pid ")) << run.dump();
  EXPECT_TRUE(run.note_contains("did not stop within 0.5 s; killing it")) << run.dump();
  EXPECT_LT(run.seconds, 30.0);
}

TEST(Launcher, SignalsReceivedAreForwardedToEveryRank) {
  int ready = 0;
  const ShellLaunch run("trap 'echo stopping; exit 0' TERM; echo ready; while true; do sleep 0.05; done", 2, 10.0,
                        [&](const Line& l) {
                          if (l.text == "ready" && ++ready == 2) ::kill(::getpid(), SIGTERM);
                        });
  EXPECT_EQ(run.status, 128 + SIGTERM) << run.dump();
  EXPECT_TRUE(run.note_contains("received signal 15")) << run.dump();
  EXPECT_TRUE(run.has(0, OutputStream::Out, "stopping")) << run.dump();
  EXPECT_TRUE(run.has(1, OutputStream::Out, "stopping")) << run.dump();
}

TEST(Launcher, AProgramThatCannotStartFails) {
  LocalLaunch launch;
  launch.executable = "/nonexistent/program";
  launch.args = {"program"};
  launch.nproc = 2;
  std::vector<std::string> lines;
  const int status =
      run_local_ranks(launch, [&](int, OutputStream, std::string_view text) { lines.emplace_back(text); });
  EXPECT_EQ(status, 127);
}
