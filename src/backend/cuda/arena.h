// Device memory: one arena allocated up front (the training step's activations, gradients and
// workspaces are bump-allocated from it, so the step never calls cudaMalloc), and a small RAII
// buffer for tests and one-off allocations. Out of memory is an error naming the sizes involved;
// there is no managed memory and no fallback.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <vector>

#include "backend/cuda/check.h"

namespace pgolf::cuda {

// Raises pgolf::Error "out of device memory: <what> needs N bytes; F of T bytes free on the device".
[[noreturn]] void raise_out_of_memory(const std::string& what, size_t requested_bytes);

// Device allocation that fails loudly (cudaMalloc + raise_out_of_memory on failure).
void* device_malloc(size_t bytes, const std::string& what);

class Arena {
 public:
  struct Region {
    std::string name;
    size_t offset = 0;
    size_t bytes = 0;
  };

  // One cudaMalloc of `capacity_bytes`; every region starts at a multiple of `alignment` (a power
  // of two, at least 16 so that vectorized 16-byte accesses are always legal).
  explicit Arena(size_t capacity_bytes, size_t alignment = 256);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // A region of `bytes` named `name` (the name appears in the out-of-memory message and in
  // regions()). Throws when the arena is full.
  void* allocate(size_t bytes, const std::string& name);
  template <typename T>
  T* allocate(size_t count, const std::string& name) {
    return static_cast<T*>(allocate(count * sizeof(T), name));
  }

  // Forget every region (the memory stays allocated; the next allocation starts at offset 0).
  void reset();

  size_t capacity() const { return capacity_; }
  size_t used() const { return used_; }
  size_t high_water() const { return high_water_; }  // largest `used()` since construction
  const std::vector<Region>& regions() const { return regions_; }
  void* base() const { return base_; }

 private:
  char* base_ = nullptr;
  size_t capacity_ = 0;
  size_t alignment_ = 0;
  size_t used_ = 0;
  size_t high_water_ = 0;
  std::vector<Region> regions_;
};

// An owned device array of `count` T (cudaMalloc'd, freed on destruction), with host copies.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count, const std::string& what = "DeviceBuffer")
      : data_(static_cast<T*>(device_malloc(count * sizeof(T), what))), count_(count) {}
  explicit DeviceBuffer(const std::vector<T>& host, const std::string& what = "DeviceBuffer")
      : DeviceBuffer(host.size(), what) {
    upload(host);
  }
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(o.data_), count_(o.count_) {
    o.data_ = nullptr;
    o.count_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (data_) cudaFree(data_);
      data_ = o.data_;
      count_ = o.count_;
      o.data_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

  void upload(const std::vector<T>& host) {
    PG_CUDA_REQUIRE(host.size() == count_, "DeviceBuffer::upload: host vector size differs from the buffer's");
    PG_CUDA_CHECK(cudaMemcpy(data_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    PG_CUDA_CHECK(cudaMemcpy(host.data(), data_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }
  // Every byte set to `byte` (tests poison outputs with 0xFF: NaN in bf16 and fp32).
  void fill_bytes(unsigned char byte) { PG_CUDA_CHECK(cudaMemset(data_, byte, bytes())); }

 private:
  T* data_ = nullptr;
  size_t count_ = 0;
};

}  // namespace pgolf::cuda
