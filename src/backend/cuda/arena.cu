#include <cstdio>
#include <string>

#include "backend/cuda/arena.h"

namespace pgolf::cuda {
namespace {

std::string bytes_text(size_t bytes) {
  char mib[32];
  std::snprintf(mib, sizeof(mib), "%.1f", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return std::to_string(bytes) + " bytes (" + mib + " MiB)";
}

}  // namespace

void raise_out_of_memory(const std::string& what, size_t requested_bytes) {
  size_t free_bytes = 0, total_bytes = 0;
  cudaGetLastError();  // clear the allocation error so that cudaMemGetInfo reports
  std::string where = "free/total unknown";
  if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess)
    where = bytes_text(free_bytes) + " free of " + bytes_text(total_bytes) + " on the device";
  std::string msg = "out of device memory: " + what + " needs " + bytes_text(requested_bytes) + "; " + where;
  raise_error(msg.c_str(), __FILE__, __LINE__);
}

void* device_malloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) raise_out_of_memory(what, bytes);
  PG_CUDA_CHECK(err);
  return p;
}

Arena::Arena(size_t capacity_bytes, size_t alignment) : capacity_(capacity_bytes), alignment_(alignment) {
  PG_CUDA_REQUIRE(alignment >= 16 && (alignment & (alignment - 1)) == 0,
                  "Arena: alignment must be a power of two of at least 16 bytes");
  base_ = static_cast<char*>(device_malloc(capacity_bytes, "the device arena"));
}

Arena::~Arena() {
  if (base_) cudaFree(base_);
}

void* Arena::allocate(size_t bytes, const std::string& name) {
  size_t offset = (used_ + alignment_ - 1) & ~(alignment_ - 1);
  if (offset > capacity_ || bytes > capacity_ - offset) {
    std::string msg = "device arena full: region '" + name + "' needs " + bytes_text(bytes) + " at offset " +
                      std::to_string(offset) + ", but the arena holds " + bytes_text(capacity_) + " (" +
                      std::to_string(regions_.size()) + " regions allocated; create it larger)";
    raise_error(msg.c_str(), __FILE__, __LINE__);
  }
  regions_.push_back(Region{name, offset, bytes});
  used_ = offset + bytes;
  if (used_ > high_water_) high_water_ = used_;
  return base_ + offset;
}

void Arena::reset() {
  regions_.clear();
  used_ = 0;
}

}  // namespace pgolf::cuda
