#include "dist/tcp_store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "core/error.h"

namespace pgolf {

// Wire format. Request: op (1 byte), body length (u32), body. Reply: status (1 byte: 0 ok, 1 error),
// payload length (u32), payload (the value, the new integer, or the error message). Integers are
// little-endian. A client has at most one request in flight.
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kHello = 'H';  // body: rank (u32), world size (u32)
constexpr char kSet = 'S';    // body: key length (u32), key, value
constexpr char kGet = 'G';    // body: key
constexpr char kAdd = 'A';    // body: delta (8 bytes), key
constexpr char kBye = 'B';    // body: empty
constexpr char kCheck = 'C';  // body: empty
constexpr size_t kHeaderBytes = 5;
constexpr uint32_t kMaxBodyBytes = 64u << 20;  // bootstrap data are bytes, not tensors

std::string errno_text() { return std::strerror(errno); }

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t get_u32(std::string_view in, size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(in[at + i])) << (8 * i);
  return v;
}

std::string frame(char tag, std::string_view body) {
  std::string out(1, tag);
  put_u32(out, static_cast<uint32_t>(body.size()));
  out.append(body);
  return out;
}

// Writes all of `bytes`; false when the peer is gone.
bool send_all(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

double seconds_left(Clock::time_point deadline) {
  return std::chrono::duration<double>(deadline - Clock::now()).count();
}

// One non-blocking connect attempt to each address of host:port, each bounded by the time left.
// Returns the connected socket or -1 (with the last error in `error`).
int try_connect(const std::string& host, int port, Clock::time_point deadline, std::string& error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    error = std::string("cannot resolve host: ") + ::gai_strerror(rc);
    return -1;
  }
  int result = -1;
  for (addrinfo* a = found; a != nullptr && result < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      error = errno_text();
      continue;
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc < 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      const int wait_ms = static_cast<int>(std::clamp(seconds_left(deadline), 0.0, 5.0) * 1000.0);
      rc = ::poll(&p, 1, wait_ms) == 1 ? 0 : -1;
      int so_error = rc == 0 ? 0 : ETIMEDOUT;
      socklen_t len = sizeof(so_error);
      if (rc == 0) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
      errno = so_error;
      rc = so_error == 0 ? 0 : -1;
    }
    if (rc == 0) {
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      set_nodelay(fd);
      result = fd;
    } else {
      error = errno_text();
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  return result;
}

// Listens on every interface (IPv6 with IPv4 mapped, else IPv4), as torchrun's store does: the
// other nodes reach rank 0 at whatever address MASTER_ADDR names.
int listen_any(int port, int& bound_port) {
  auto bind_listen = [&](int family) -> int {
    const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1, zero = 0;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_storage addr{};
    socklen_t len;
    if (family == AF_INET6) {
      ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
      auto* a6 = reinterpret_cast<sockaddr_in6*>(&addr);
      a6->sin6_family = AF_INET6;
      a6->sin6_addr = in6addr_any;
      a6->sin6_port = htons(static_cast<uint16_t>(port));
      len = sizeof(sockaddr_in6);
    } else {
      auto* a4 = reinterpret_cast<sockaddr_in*>(&addr);
      a4->sin_family = AF_INET;
      a4->sin_addr.s_addr = htonl(INADDR_ANY);
      a4->sin_port = htons(static_cast<uint16_t>(port));
      len = sizeof(sockaddr_in);
    }
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(fd, 1024) != 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      return -1;
    }
    len = sizeof(addr);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    bound_port = ntohs(family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
    return fd;
  };
  int fd = bind_listen(AF_INET6);
  if (fd < 0 && errno != EADDRINUSE) fd = bind_listen(AF_INET);
  if (fd < 0)
    fail("rank 0 cannot serve the rendezvous store on port {}: {} (is another run using this MASTER_PORT?)", port,
         errno_text());
  return fd;
}

}  // namespace

std::string encode_store_int(int64_t v) {
  std::string out(8, '\0');
  const auto u = static_cast<uint64_t>(v);
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((u >> (8 * i)) & 0xff);
  return out;
}

int64_t decode_store_int(std::string_view bytes, const std::string& key) {
  PG_CHECK(bytes.size() == 8, "rendezvous store key '{}' holds {} bytes, not an 8-byte integer", key, bytes.size());
  uint64_t u = 0;
  for (size_t i = 0; i < 8; ++i) u |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  return static_cast<int64_t>(u);
}

int find_free_tcp_port() {
  int port = 0;
  const int fd = listen_any(0, port);
  ::close(fd);
  return port;
}

// ---- server (rank 0) ---------------------------------------------------------------------------

class TcpStore::Server {
 public:
  Server(int port, int world) : world_(world) {
    listen_fd_ = listen_any(port, port_);
    if (::pipe2(wake_, O_CLOEXEC) != 0) {
      ::close(listen_fd_);
      fail("rendezvous store: pipe2 failed: {}", errno_text());
    }
    thread_ = std::thread([this] { serve(); });
  }
  ~Server() { stop_now(); }

  int port() const { return port_; }

  // Serves until every rank has left or `seconds` have passed; false on the timeout.
  bool finish(double seconds) {
    bool all_left;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait_for(lk, std::chrono::duration<double>(seconds), [&] { return stopped_; });
      all_left = stopped_ && all_left_;
    }
    stop_now();
    return all_left;
  }

  void stop_now() {
    if (!thread_.joinable()) return;
    const char c = 'x';
    [[maybe_unused]] ssize_t n = ::write(wake_[1], &c, 1);
    thread_.join();
    ::close(wake_[0]);
    ::close(wake_[1]);
    ::close(listen_fd_);
  }

 private:
  struct Conn {
    int fd = -1;
    int rank = -1;  // after its hello
    bool left = false;
    std::string in;
    std::optional<std::string> waiting_for;  // a get on an absent key
  };

  void reply(Conn& c, bool ok, std::string_view payload) {
    std::string out(1, ok ? '\0' : '\1');
    put_u32(out, static_cast<uint32_t>(payload.size()));
    out.append(payload);
    send_all(c.fd, out);  // a peer that is gone shows up as end-of-file on its next read
  }

  // The rank's process ended without a goodbye: no wait can be trusted to finish any more.
  void lost(Conn& c) {
    if (c.rank < 0 || c.left) return;
    c.left = true;
    ++departed_;
    if (dead_message_.empty())
      dead_message_ = fmt::format("rank {} left the rendezvous store without saying goodbye (its process ended or "
                                  "crashed)",
                                  c.rank);
    for (Conn& o : conns_)
      if (o.waiting_for) {
        o.waiting_for.reset();
        reply(o, false, dead_message_);
      }
  }

  void wake_waiters(const std::string& key) {
    for (Conn& o : conns_)
      if (o.waiting_for && *o.waiting_for == key) {
        o.waiting_for.reset();
        reply(o, true, data_[key]);
      }
  }

  void handle(Conn& c, char op, std::string_view body) {
    if (op == kHello) {
      const int rank = body.size() == 8 ? static_cast<int>(get_u32(body, 0)) : -1;
      const int world = body.size() == 8 ? static_cast<int>(get_u32(body, 4)) : -1;
      if (world != world_)
        return reply(c, false, fmt::format("rank {} says the world size is {}, rank 0 says {}", rank, world, world_));
      if (rank < 0 || rank >= world_) return reply(c, false, fmt::format("rank {} is outside [0, {})", rank, world_));
      if (!claimed_.insert(rank).second) return reply(c, false, fmt::format("two processes claim rank {}", rank));
      c.rank = rank;
      return reply(c, true, {});
    }
    if (c.rank < 0) return reply(c, false, "the first request must be a hello");
    switch (op) {
      case kSet: {
        if (body.size() < 4 || get_u32(body, 0) > body.size() - 4) return reply(c, false, "malformed set");
        const uint32_t klen = get_u32(body, 0);
        std::string key(body.substr(4, klen));
        data_[key] = std::string(body.substr(4 + klen));
        reply(c, true, {});
        return wake_waiters(key);
      }
      case kGet: {
        std::string key(body);
        if (auto it = data_.find(key); it != data_.end()) return reply(c, true, it->second);
        if (!dead_message_.empty()) return reply(c, false, dead_message_);
        c.waiting_for = std::move(key);
        return;
      }
      case kAdd: {
        if (body.size() < 8) return reply(c, false, "malformed add");
        std::string key(body.substr(8));
        int64_t value = decode_store_int(body.substr(0, 8), key);
        if (auto it = data_.find(key); it != data_.end()) {
          if (it->second.size() != 8)
            return reply(c, false, fmt::format("key '{}' holds {} bytes, not an integer", key, it->second.size()));
          value += decode_store_int(it->second, key);
        }
        data_[key] = encode_store_int(value);
        reply(c, true, data_[key]);
        return wake_waiters(key);
      }
      case kBye:
        if (!c.left) {
          c.left = true;
          ++departed_;
        }
        return reply(c, true, {});
      case kCheck:
        return reply(c, dead_message_.empty(), dead_message_);
      default:
        return reply(c, false, fmt::format("unknown request {}", static_cast<int>(op)));
    }
  }

  // Handles every complete request in c.in; false when the connection must close.
  bool consume(Conn& c) {
    while (c.in.size() >= kHeaderBytes) {
      const uint32_t len = get_u32(c.in, 1);
      if (len > kMaxBodyBytes) return false;
      if (c.in.size() < kHeaderBytes + len) break;
      const char op = c.in[0];
      const std::string body = c.in.substr(kHeaderBytes, len);
      c.in.erase(0, kHeaderBytes + len);
      handle(c, op, body);
    }
    return true;
  }

  void serve() {
    try {
      while (true) {
        std::vector<pollfd> fds = {{wake_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}};
        for (const Conn& c : conns_) fds.push_back({c.fd, POLLIN, 0});
        if (::poll(fds.data(), fds.size(), -1) < 0) {
          if (errno == EINTR) continue;
          fail("poll failed: {}", errno_text());
        }
        if (fds[0].revents) break;  // stop_now()
        if (fds[1].revents & POLLIN) {
          const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
          if (fd >= 0) {
            set_nodelay(fd);
            conns_.emplace_back().fd = fd;
          }
        }
        for (size_t i = 2; i < fds.size(); ++i) {
          if (!fds[i].revents) continue;
          Conn& c = conns_[i - 2];
          char buf[65536];
          const ssize_t n = ::recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
          if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
          if (n > 0) c.in.append(buf, static_cast<size_t>(n));
          if (n <= 0 || !consume(c)) {
            lost(c);
            ::close(c.fd);
            c.fd = -1;
          }
        }
        conns_.erase(std::remove_if(conns_.begin(), conns_.end(), [](const Conn& c) { return c.fd < 0; }),
                     conns_.end());
        if (departed_ == world_) break;
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "pgolf: the rendezvous store stopped serving: %s\n", e.what());
    }
    for (Conn& c : conns_) ::close(c.fd);
    conns_.clear();
    std::lock_guard<std::mutex> lk(mu_);
    stopped_ = true;
    all_left_ = departed_ == world_;
    cv_.notify_all();
  }

  int world_;
  int listen_fd_ = -1, port_ = 0;
  int wake_[2] = {-1, -1};
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopped_ = false, all_left_ = false;
  // Owned by the server thread.
  std::vector<Conn> conns_;
  std::map<std::string, std::string> data_;
  std::set<int> claimed_;
  int departed_ = 0;
  std::string dead_message_;
};

// ---- client (every rank) -----------------------------------------------------------------------

TcpStore::TcpStore(const std::string& host, int port, int rank, int world_size, double timeout_s)
    : rank_(rank), world_(world_size), port_(port), timeout_s_(timeout_s) {
  PG_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "rendezvous store: rank {} of world size {}", rank,
           world_size);
  PG_CHECK(timeout_s > 0.0, "rendezvous store: timeout {} s must be positive", timeout_s);
  PG_CHECK(rank == 0 || (port > 0 && port < 65536), "rendezvous store: port {} is not in 1..65535", port);
  std::string connect_host = host;
  if (rank == 0) {
    server_ = std::make_unique<Server>(port, world_size);
    port_ = server_->port();
    connect_host = "127.0.0.1";  // the server listens on every interface, loopback included
  }
  endpoint_ = fmt::format("{}:{}", host, port_);

  const auto deadline = deadline_after(timeout_s);
  std::string error;
  auto pause = std::chrono::milliseconds(20);
  while ((fd_ = try_connect(connect_host, port_, deadline, error)) < 0) {
    if (Clock::now() >= deadline)
      fail("rank {}: could not reach the rendezvous store at {} within {:g} s: {} (rank 0 serves it: did it "
           "start? do MASTER_ADDR and MASTER_PORT name rank 0's machine and a free port?)",
           rank, endpoint_, timeout_s, error);
    std::this_thread::sleep_for(std::min(pause, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                    std::chrono::duration<double>(seconds_left(deadline)))));
    pause = std::min(pause * 2, std::chrono::milliseconds(1000));
  }
  std::string hello;
  put_u32(hello, static_cast<uint32_t>(rank));
  put_u32(hello, static_cast<uint32_t>(world_size));
  try {
    request(kHello, hello, "joining");
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

TcpStore::~TcpStore() {
  // A rank unwinding an exception leaves without a goodbye, so the others learn that it failed.
  const bool failing = std::uncaught_exceptions() > 0;
  if (fd_ >= 0) {
    if (!broken_ && !failing) {
      try {
        request(kBye, {}, "leaving");
      } catch (const std::exception&) {
        // Leaving a store that is already gone needs no report.
      }
    }
    ::close(fd_);
  }
  if (!server_) return;
  if (failing) {
    server_->stop_now();
  } else if (!server_->finish(timeout_s_)) {
    std::fprintf(stderr, "pgolf: rank 0 stopped serving the rendezvous store after %g s: not every rank left it\n",
                 timeout_s_);
  }
}

std::string TcpStore::request(char op, std::string_view body, const std::string& what) {
  PG_CHECK(!broken_, "rank {}: the connection to the rendezvous store at {} broke in an earlier request", rank_,
           endpoint_);
  broken_ = true;  // until the reply has been read in full
  if (!send_all(fd_, frame(op, body)))
    fail("rank {}: {}: the rendezvous store at {} is gone ({}; rank 0, which serves it, exited or failed)", rank_,
         what, endpoint_, errno_text());
  const auto deadline = deadline_after(timeout_s_);
  std::string reply;
  size_t need = kHeaderBytes;
  while (reply.size() < need) {
    pollfd p{fd_, POLLIN, 0};
    const double left = seconds_left(deadline);
    const int ready = left > 0 ? ::poll(&p, 1, static_cast<int>(std::ceil(left * 1000.0))) : 0;
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0)
      fail("rank {}: {} timed out after {:g} s at the rendezvous store {} (a rank is missing, stuck or slower than "
           "PGOLF_DIST_TIMEOUT allows)",
           rank_, what, timeout_s_, endpoint_);
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, std::min(sizeof(buf), need - reply.size()), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      fail("rank {}: {}: the rendezvous store at {} closed the connection (rank 0, which serves it, exited or "
           "failed)",
           rank_, what, endpoint_);
    reply.append(buf, static_cast<size_t>(n));
    if (reply.size() == kHeaderBytes) need = kHeaderBytes + get_u32(reply, 1);
  }
  broken_ = false;
  std::string payload = reply.substr(kHeaderBytes);
  if (reply[0] != '\0') fail("rank {}: {}: {}", rank_, what, payload);
  return payload;
}

void TcpStore::set(const std::string& key, std::string_view value) {
  std::string body;
  put_u32(body, static_cast<uint32_t>(key.size()));
  body += key;
  body.append(value);
  request(kSet, body, fmt::format("setting '{}'", key));
}

std::string TcpStore::get(const std::string& key) { return request(kGet, key, fmt::format("waiting for '{}'", key)); }

int64_t TcpStore::add(const std::string& key, int64_t delta) {
  return decode_store_int(request(kAdd, encode_store_int(delta) + key, fmt::format("adding to '{}'", key)), key);
}

void TcpStore::barrier() {
  const std::string key = fmt::format("pgolf/barrier/{}", barriers_++);
  if (add(key, 1) == world_) set(key + "/done", {});
  request(kGet, key + "/done", "waiting at a barrier");
}

void TcpStore::check_peers() { request(kCheck, {}, "checking the other ranks"); }

}  // namespace pgolf
