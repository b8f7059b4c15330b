// TcpStore: the small key-value store that bootstraps a multi-process run, as torchrun's TCPStore
// does: rank 0 serves it on MASTER_ADDR:MASTER_PORT, every rank (rank 0 too) is a client. It carries
// bytes of bootstrap data only — NCCL's unique id, host names, barriers before NCCL exists, the shared
// work counter — never tensors (those go through NCCL).
//
// Failures are loud: a connection that cannot be made within the timeout, a wait that outlasts it, a
// rank whose process ended without saying goodbye (every blocked and later wait fails naming it), two
// processes claiming one rank, ranks that disagree on the world size.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace pgolf {

class TcpStore {
 public:
  // Rank 0 starts the server on `port` (0 = a free port the system picks; see port()) before
  // connecting; the other ranks connect to host:port, retrying until `timeout_s` has passed.
  TcpStore(const std::string& host, int port, int rank, int world_size, double timeout_s);
  // Says goodbye. Rank 0 keeps serving until every rank has left (at most timeout_s). During
  // exception unwinding a rank leaves without a goodbye (the others' waits fail naming it) and rank 0
  // stops serving at once.
  ~TcpStore();
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  int port() const { return port_; }
  double timeout_s() const { return timeout_s_; }

  void set(const std::string& key, std::string_view value);
  // Waits until `key` is set (at most timeout_s) and returns its value.
  std::string get(const std::string& key);
  // Atomically adds `delta` to the integer under `key` (absent = 0) and returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  // Every rank calls it, in the same order: returns once all have arrived.
  void barrier();
  // Throws when a rank has left the store without saying goodbye (its process ended or crashed).
  void check_peers();

 private:
  class Server;
  std::string request(char op, std::string_view body, const std::string& what);

  int rank_, world_, port_;
  double timeout_s_;
  std::string endpoint_;  // host:port, for messages
  std::unique_ptr<Server> server_;
  int fd_ = -1;
  bool broken_ = false;  // an earlier request failed mid-way: the connection's state is unknown
  int64_t barriers_ = 0;
};

// A TCP port on this machine that was free a moment ago (bound to port 0, read back, closed).
int find_free_tcp_port();

// The integer encoding of add(): 8 bytes, little-endian two's complement. set() with it resets a counter.
std::string encode_store_int(int64_t v);
int64_t decode_store_int(std::string_view bytes, const std::string& key);

}  // namespace pgolf
