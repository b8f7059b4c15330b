#include "dist/collective_checks.h"

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "core/error.h"
#include "core/half.h"

namespace pgolf {

namespace {

class HostBufferSpace final : public BufferSpace {
 public:
  void* allocate(size_t bytes) override { return ::operator new(std::max<size_t>(bytes, 1)); }
  void release(void* p) override { ::operator delete(p); }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
};

constexpr DType kDtypes[] = {DType::F32, DType::F64, DType::BF16, DType::I32, DType::I64};

bool is_float(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16; }

// Unit roundoff of the element type (0 for integers).
double unit_roundoff(DType t) {
  switch (t) {
    case DType::F32: return std::ldexp(1.0, -24);
    case DType::F64: return std::ldexp(1.0, -53);
    case DType::BF16: return std::ldexp(1.0, -8);
    default: return 0.0;
  }
}

const char* op_name(ReduceOp op) { return op == ReduceOp::Sum ? "Sum" : op == ReduceOp::Avg ? "Avg" : "Max"; }

// What rank r contributes at element i: a small signed integer whose maximum moves between ranks,
// scaled so every dtype is exercised where it differs (F32 half-integers, F64 eighths, I32 large,
// I64 beyond 32 bits). Every partial sum over up to 32 ranks is exact in every dtype (BF16: integers
// of magnitude <= 256), and double holds them all.
double contribution(int r, size_t i, DType t) {
  const auto k = static_cast<int64_t>(i);
  const double base = static_cast<double>(((r + 1) * (k % 7 + 1) + k) % 11) - 3.0;
  switch (t) {
    case DType::F32: return 0.5 * base;
    case DType::F64: return base + 0.125 * (r + 1);
    case DType::I32: return base * 1000003.0;
    case DType::I64: return base + std::ldexp(static_cast<double>(r + 1), 33);
    default: return base;
  }
}

void store_value(DType t, void* p, size_t i, double v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16_bits(static_cast<float>(v)); break;
    case DType::I32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::I64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    default: fail("collective checks: dtype {}", dtype_name(t));
  }
}

double load_value(DType t, const void* p, size_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    default: fail("collective checks: dtype {}", dtype_name(t));
  }
}

// The reduction over ranks of element j, and the tolerance of comparing with it.
struct Expected {
  double value, tolerance;
};
Expected reduce_expected(int world, size_t j, DType t, ReduceOp op) {
  double sum = 0.0, abs_sum = 0.0, max = -INFINITY;
  for (int r = 0; r < world; ++r) {
    const double v = contribution(r, j, t);
    sum += v;
    abs_sum += std::abs(v);
    max = std::max(max, v);
  }
  if (op == ReduceOp::Max) return {max, 0.0};
  if (op == ReduceOp::Sum) return {sum, 0.0};
  return {sum / world, (2.0 * world + 1.0) * unit_roundoff(t) * abs_sum / world};
}

class Checker {
 public:
  Checker(Communicator& comm, BufferSpace& space) : comm_(comm), space_(space) {}

  // A device (or host) buffer of `n` elements, filled from fill(i) when given.
  struct Buffer {
    BufferSpace& space;
    void* ptr;
    ~Buffer() { space.release(ptr); }
  };
  Buffer buffer(DType t, size_t n, const std::function<double(size_t)>& fill = {}) {
    Buffer b{space_, space_.allocate(n * dtype_size(t))};
    if (fill) {
      std::vector<uint8_t> host(n * dtype_size(t));
      for (size_t i = 0; i < n; ++i) store_value(t, host.data(), i, fill(i));
      space_.upload(b.ptr, host.data(), host.size());
    }
    return b;
  }

  // Compares the buffer's n elements with expected(i).
  void compare(const std::string& what, DType t, const void* data, size_t n,
               const std::function<Expected(size_t)>& expected) {
    std::vector<uint8_t> host(n * dtype_size(t));
    space_.download(host.data(), data, host.size());
    int reported = 0;
    for (size_t i = 0; i < n && reported < 3; ++i) {
      const double got = load_value(t, host.data(), i);
      const Expected e = expected(i);
      if (std::abs(got - e.value) <= e.tolerance) continue;
      failures.push_back(fmt::format("rank {} of {}: {} {}: element {} is {}, expected {} (tolerance {})",
                                     comm_.rank(), comm_.world_size(), what, dtype_name(t), i, got, e.value,
                                     e.tolerance));
      ++reported;
    }
  }

  void device_collectives(DType t, size_t n) {
    const int w = comm_.world_size(), me = comm_.rank();
    std::vector<ReduceOp> ops = {ReduceOp::Sum, ReduceOp::Max};
    if (is_float(t)) ops.push_back(ReduceOp::Avg);
    for (ReduceOp op : ops) {
      Buffer b = buffer(t, n, [&](size_t i) { return contribution(me, i, t); });
      comm_.all_reduce(b.ptr, n, t, op);
      compare(fmt::format("all_reduce {}", op_name(op)), t, b.ptr, n,
              [&](size_t i) { return reduce_expected(w, i, t, op); });
      if (op == ReduceOp::Max) continue;  // the references reduce-scatter with Sum / Avg only
      Buffer in = buffer(t, n * static_cast<size_t>(w), [&](size_t j) { return contribution(me, j, t); });
      Buffer out = buffer(t, n);
      comm_.reduce_scatter(in.ptr, out.ptr, n, t, op);
      compare(fmt::format("reduce_scatter {}", op_name(op)), t, out.ptr, n,
              [&](size_t i) { return reduce_expected(w, static_cast<size_t>(me) * n + i, t, op); });
    }
    Buffer mine = buffer(t, n, [&](size_t i) { return contribution(me, i, t); });
    Buffer all = buffer(t, n * static_cast<size_t>(w));
    comm_.all_gather(mine.ptr, all.ptr, n, t);
    compare("all_gather", t, all.ptr, n * static_cast<size_t>(w), [&](size_t j) {
      return Expected{contribution(static_cast<int>(j / n), j % n, t), 0.0};
    });
    for (int root : {0, w - 1}) {
      Buffer b = buffer(t, n, [&](size_t i) { return contribution(me, i, t); });
      comm_.broadcast(b.ptr, n, t, root);
      compare(fmt::format("broadcast from rank {}", root), t, b.ptr, n,
              [&](size_t i) { return Expected{contribution(root, i, t), 0.0}; });
    }
  }

  void host_reductions(size_t n) {
    const int w = comm_.world_size(), me = comm_.rank();
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max}) {
      std::vector<double> v(n);
      for (size_t i = 0; i < n; ++i) v[i] = contribution(me, i, DType::F64);
      comm_.all_reduce_host(v.data(), n, op);
      for (size_t i = 0; i < n; ++i) {
        const Expected e = reduce_expected(w, i, DType::F64, op);
        if (std::abs(v[i] - e.value) > e.tolerance) {
          failures.push_back(fmt::format("rank {} of {}: all_reduce_host {}: element {} is {}, expected {}", me, w,
                                         op_name(op), i, v[i], e.value));
          break;
        }
      }
    }
  }

  // Three tickets per rank from a counter reset to 1000: together exactly 1000 .. 1000 + 3w - 1.
  void counter() {
    const int w = comm_.world_size(), me = comm_.rank();
    constexpr int kTickets = 3;
    comm_.reset_counter(1000);
    std::vector<double> tickets(static_cast<size_t>(kTickets * w), 0.0);
    for (int k = 0; k < kTickets; ++k)
      tickets[static_cast<size_t>(me * kTickets + k)] = static_cast<double>(comm_.fetch_add(1));
    comm_.all_reduce_host(tickets.data(), tickets.size(), ReduceOp::Sum);
    std::sort(tickets.begin(), tickets.end());
    for (size_t k = 0; k < tickets.size(); ++k)
      if (tickets[k] != 1000.0 + static_cast<double>(k)) {
        failures.push_back(fmt::format("rank {} of {}: fetch_add tickets are not 1000..{} each once: [{}]", me, w,
                                       1000 + kTickets * w - 1, fmt::join(tickets, ", ")));
        break;
      }
    comm_.reset_counter(7);
    const int64_t now = comm_.fetch_add(0);
    if (now != 7)
      failures.push_back(fmt::format("rank {} of {}: after reset_counter(7), fetch_add(0) = {}", me, w, now));
    comm_.barrier();
  }

  std::vector<std::string> failures;

 private:
  Communicator& comm_;
  BufferSpace& space_;
};

}  // namespace

std::unique_ptr<BufferSpace> make_host_buffer_space() { return std::make_unique<HostBufferSpace>(); }

std::vector<std::string> check_collectives(Communicator& comm, BufferSpace& space, size_t count) {
  PG_CHECK(count >= 1, "collective checks need at least one element");
  PG_CHECK(comm.world_size() <= 32, "collective checks are exact up to 32 ranks, not {}", comm.world_size());
  Checker c(comm, space);
  for (DType t : kDtypes) c.device_collectives(t, count);
  c.host_reductions(count);
  c.counter();
  return c.failures;
}

}  // namespace pgolf
