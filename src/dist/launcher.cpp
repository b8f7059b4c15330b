#include "dist/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>

#include "core/error.h"
#include "dist/rendezvous.h"
#include "dist/tcp_store.h"

extern char** environ;

namespace pgolf {

namespace {

using Clock = std::chrono::steady_clock;

// SIGINT, SIGTERM and SIGHUP are forwarded to the ranks; SIGCHLD only wakes the loop, so the rank
// that failed first is the one reported.
constexpr int kHandledSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGCHLD};

// Signals reach the poll loop through this pipe (a handler may only write(2)).
int g_signal_pipe[2] = {-1, -1};

void on_signal(int sig) {
  const int saved = errno;
  const unsigned char c = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = ::write(g_signal_pipe[1], &c, 1);
  errno = saved;
}

// Installs the forwarding handlers for the launcher's lifetime and restores the previous ones.
class SignalForwarding {
 public:
  SignalForwarding() {
    PG_CHECK(::pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) == 0, "launcher: pipe2 failed: {}", std::strerror(errno));
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (size_t i = 0; i < std::size(kHandledSignals); ++i) ::sigaction(kHandledSignals[i], &sa, &previous_[i]);
  }
  ~SignalForwarding() {
    for (size_t i = 0; i < std::size(kHandledSignals); ++i) ::sigaction(kHandledSignals[i], &previous_[i], nullptr);
    ::close(g_signal_pipe[0]);
    ::close(g_signal_pipe[1]);
    g_signal_pipe[0] = g_signal_pipe[1] = -1;
  }
  int read_fd() const { return g_signal_pipe[0]; }

 private:
  struct sigaction previous_[std::size(kHandledSignals)] {};
};

struct RankProcess {
  int rank = 0;
  pid_t pid = -1;
  int fds[2] = {-1, -1};  // read ends of its stdout and stderr
  std::string partial[2];
  bool running = true;
};

// The environment of one rank: ours, with the launch variables replaced and the NCCL defaults added.
std::vector<std::string> rank_environment(const LocalLaunch& launch, int rank, int port) {
  std::vector<std::pair<std::string, std::string>> set = {
      {"RANK", std::to_string(rank)},         {"WORLD_SIZE", std::to_string(launch.nproc)},
      {"LOCAL_RANK", std::to_string(rank)},   {"LOCAL_WORLD_SIZE", std::to_string(launch.nproc)},
      {"GROUP_RANK", "0"},                    {"MASTER_ADDR", "127.0.0.1"},
      {"MASTER_PORT", std::to_string(port)},
  };
  for (const auto& kv : launch.env) set.push_back(kv);
  for (const auto& [name, value] : default_nccl_environment())
    if (!std::getenv(name.c_str())) set.emplace_back(name, value);
  // The store listens on MASTER_PORT itself here: no torchrun agent holds it.
  std::set<std::string> replaced = {"TORCHELASTIC_USE_AGENT_STORE", "PGOLF_STORE_PORT"};
  for (const auto& kv : set) replaced.insert(kv.first);
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e;
    if (!replaced.count(entry.substr(0, entry.find('=')))) env.push_back(entry);
  }
  for (const auto& [name, value] : set) env.push_back(name + "=" + value);
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

RankProcess start_rank(const LocalLaunch& launch, int rank, int port) {
  std::vector<std::string> env = rank_environment(launch, rank, port);
  std::vector<std::string> args = launch.args;
  std::vector<char*> envp = c_strings(env), argv = c_strings(args);
  int out[2], err[2];
  PG_CHECK(::pipe2(out, O_CLOEXEC) == 0 && ::pipe2(err, O_CLOEXEC) == 0, "launcher: pipe2 failed: {}",
           std::strerror(errno));
  const pid_t parent = ::getpid();
  // The child must not run the launcher's handlers (they would write into the launcher's signal
  // pipe): the signals stay blocked across fork until the child has restored the defaults.
  sigset_t handled, previous;
  sigemptyset(&handled);
  for (int sig : kHandledSignals) sigaddset(&handled, sig);
  ::sigprocmask(SIG_BLOCK, &handled, &previous);
  const pid_t pid = ::fork();
  if (pid == 0) {
    // The child: only async-signal-safe calls until exec.
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    for (int sig : kHandledSignals) ::sigaction(sig, &default_action, nullptr);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::setpgid(0, 0);                       // terminal signals reach the launcher, which forwards them
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);    // the ranks die with the launcher
    if (::getppid() != parent) ::_exit(128 + SIGTERM);
    const int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd < 0 || ::dup2(null_fd, 0) < 0 || ::dup2(out[1], 1) < 0 || ::dup2(err[1], 2) < 0) ::_exit(127);
    ::execve(launch.executable.c_str(), argv.data(), envp.data());
    const char msg[] = "launcher: exec failed\n";
    [[maybe_unused]] ssize_t n = ::write(2, msg, sizeof(msg) - 1);
    ::_exit(127);
  }
  const int fork_errno = errno;
  // The child's process group exists before any kill(-pid) of ours (the child sets it too).
  if (pid > 0) ::setpgid(pid, pid);
  ::sigprocmask(SIG_SETMASK, &previous, nullptr);
  ::close(out[1]);
  ::close(err[1]);
  if (pid < 0) {
    ::close(out[0]);
    ::close(err[0]);
    fail("launcher: fork of rank {} failed: {}", rank, std::strerror(fork_errno));
  }
  RankProcess p;
  p.rank = rank;
  p.pid = pid;
  p.fds[0] = out[0];
  p.fds[1] = err[0];
  return p;
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status))
    return fmt::format("was ended by signal {} ({})", WTERMSIG(status), ::strsignal(WTERMSIG(status)));
  return fmt::format("exited with status {}", WEXITSTATUS(status));
}

int exit_code_of(int status) { return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status); }

}  // namespace

void print_rank_line(int rank, OutputStream stream, std::string_view line) {
  FILE* f = stream == OutputStream::Out ? stdout : stderr;
  if (rank < 0) std::fprintf(f, "pgolf: %.*s\n", static_cast<int>(line.size()), line.data());
  else std::fprintf(f, "[rank %d] %.*s\n", rank, static_cast<int>(line.size()), line.data());
  std::fflush(f);
}

LineSink rank0_document_sink(std::function<void(std::string_view)> document, LineSink others) {
  return [document = std::move(document), others = std::move(others)](int rank, OutputStream stream,
                                                                         std::string_view line) {
    if (rank == 0 && stream == OutputStream::Out) document(line);
    else others(rank, OutputStream::Err, line);
  };
}

int run_local_ranks(const LocalLaunch& launch, const LineSink& sink) {
  PG_CHECK(launch.nproc >= 1, "launcher: {} processes requested", launch.nproc);
  PG_CHECK(!launch.args.empty(), "launcher: no program arguments");
  SignalForwarding signals;
  const int port = find_free_tcp_port();
  std::vector<RankProcess> ranks;
  try {
    for (int r = 0; r < launch.nproc; ++r) ranks.push_back(start_rank(launch, r, port));
  } catch (...) {
    for (RankProcess& p : ranks) {
      ::kill(-p.pid, SIGKILL);
      ::waitpid(p.pid, nullptr, 0);
    }
    throw;
  }

  auto emit = [&](RankProcess& p, int which, bool flush) {
    std::string& buf = p.partial[which];
    size_t start = 0;
    for (size_t nl; (nl = buf.find('\n', start)) != std::string::npos; start = nl + 1)
      sink(p.rank, which == 0 ? OutputStream::Out : OutputStream::Err, std::string_view(buf).substr(start, nl - start));
    buf.erase(0, start);
    if (flush && !buf.empty()) {
      sink(p.rank, which == 0 ? OutputStream::Out : OutputStream::Err, buf);
      buf.clear();
    }
  };
  // Reads what is there; `wait_ms` bounds the wait for the first byte.
  auto pump = [&](int wait_ms) {
    std::vector<pollfd> fds = {{signals.read_fd(), POLLIN, 0}};
    std::vector<std::pair<RankProcess*, int>> owner = {{nullptr, 0}};
    for (RankProcess& p : ranks)
      for (int w = 0; w < 2; ++w)
        if (p.fds[w] >= 0) {
          fds.push_back({p.fds[w], POLLIN, 0});
          owner.emplace_back(&p, w);
        }
    if (::poll(fds.data(), fds.size(), wait_ms) <= 0) return std::vector<int>();
    std::vector<int> received;
    for (size_t i = 0; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      char buf[65536];
      const ssize_t n = ::read(fds[i].fd, buf, sizeof(buf));
      if (i == 0) {
        for (ssize_t k = 0; k < n; ++k) received.push_back(static_cast<unsigned char>(buf[k]));
        continue;
      }
      auto [p, w] = owner[i];
      if (n > 0) {
        p->partial[w].append(buf, static_cast<size_t>(n));
        emit(*p, w, false);
      } else if (n == 0 || errno != EINTR) {
        emit(*p, w, true);
        ::close(p->fds[w]);
        p->fds[w] = -1;
      }
    }
    return received;
  };

  std::optional<int> failure;  // exit code of the first failing rank
  int interrupted = 0;         // the last signal forwarded
  std::optional<Clock::time_point> kill_at;
  auto terminate_all = [&](int sig) {
    for (RankProcess& p : ranks)
      if (p.running) ::kill(-p.pid, sig);
    if (!kill_at) kill_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                               std::chrono::duration<double>(launch.grace_seconds));
  };

  size_t running = ranks.size();
  while (running > 0) {
    for (int sig : pump(100)) {
      if (sig == SIGCHLD) continue;
      interrupted = sig;
      sink(-1, OutputStream::Err, fmt::format("received signal {} ({}); forwarding it to every rank", sig,
                                              ::strsignal(sig)));
      terminate_all(sig);
    }
    for (RankProcess& p : ranks) {
      if (!p.running) continue;
      int status = 0;
      if (::waitpid(p.pid, &status, WNOHANG) != p.pid) continue;
      p.running = false;
      --running;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (ok || failure || interrupted) continue;
      failure = exit_code_of(status);
      sink(-1, OutputStream::Err,
           fmt::format("rank {} (pid {}) {}; stopping the other ranks", p.rank, p.pid, describe_status(status)));
      terminate_all(SIGTERM);
    }
    if (kill_at && Clock::now() >= *kill_at) {
      for (RankProcess& p : ranks)
        if (p.running) {
          sink(-1, OutputStream::Err, fmt::format("rank {} (pid {}) did not stop within {:g} s; killing it", p.rank,
                                                  p.pid, launch.grace_seconds));
          ::kill(-p.pid, SIGKILL);
        }
      kill_at = Clock::now() + std::chrono::hours(24);  // once
    }
  }
  // Every rank has exited, so what it wrote is in the pipes; a process it left behind may still hold
  // one open, so read without waiting.
  for (RankProcess& p : ranks)
    for (int w = 0; w < 2; ++w) {
      if (p.fds[w] < 0) continue;
      ::fcntl(p.fds[w], F_SETFL, ::fcntl(p.fds[w], F_GETFL) | O_NONBLOCK);
      char buf[65536];
      for (ssize_t n; (n = ::read(p.fds[w], buf, sizeof(buf))) > 0;) p.partial[w].append(buf, static_cast<size_t>(n));
      emit(p, w, true);
      ::close(p.fds[w]);
    }
  if (interrupted) return 128 + interrupted;
  return failure.value_or(0);
}

}  // namespace pgolf
