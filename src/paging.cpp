// The page manager's host side: the registry of paged buffers, the free-memory check and
// plain page-aligned host buffers. Managed (device) memory goes through detail::managed_*
// (cuda/paging.cu, or src/optim_cuda_stubs.cpp in a CPU-only build). See
// include/fourbit/paging.h for the contract.
#include "fourbit/paging.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "fourbit/error.h"

namespace fourbit {
namespace {

// Host buffers are page-aligned, like managed memory.
constexpr int64_t kHostAlignment = 4096;

// MemAvailable from /proc/meminfo (what the kernel could give without swapping), else free
// physical pages.
int64_t host_available_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t value_kib = 0;
  std::string unit;
  while (meminfo >> key >> value_kib >> unit) {
    if (key == "MemAvailable:") return value_kib * 1024;
  }
  return static_cast<int64_t>(sysconf(_SC_AVPHYS_PAGES)) * sysconf(_SC_PAGESIZE);
}

std::string device_name(int device) {
  return device == kHostDevice ? std::string("the host") : detail::concat("cuda:", device);
}

}  // namespace

MemoryInfo memory_info(int device) {
  if (device == kHostDevice) {
    MemoryInfo info;
    info.free_bytes = host_available_bytes();
    info.total_bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
    return info;
  }
  FOURBIT_CHECK_ARG(device >= 0, "memory_info: device must be >= 0 or -1 (host), got ", device);
  return detail::device_memory_info(device);
}

void check_paged_request(int64_t bytes, const MemoryInfo& info, int device) {
  FOURBIT_CHECK_ARG(bytes >= 0, "paged allocation: bytes must be >= 0, got ", bytes);
  const int64_t usable = info.free_bytes - kPagedHeadroomBytes;
  FOURBIT_CHECK_RUNTIME(bytes <= usable, "paged allocation: bytes = ", bytes,
                        " does not fit into the free memory of ", device_name(device), " (",
                        info.free_bytes, " bytes free of ", info.total_bytes, ", minus a headroom of ",
                        kPagedHeadroomBytes, " bytes); refusing to over-subscribe managed memory. "
                        "Free memory, use 8-bit states, or keep these states unpaged.");
}

PageManager& PageManager::instance() {
  static PageManager* manager = new PageManager();  // never destroyed: tensors may outlive main
  return *manager;
}

void* PageManager::allocate(int64_t bytes, int device) {
  FOURBIT_CHECK_ARG(device >= kHostDevice, "paged allocation: device must be >= 0 or -1 (host), got ",
                    device);
  check_paged_request(bytes, memory_info(device), device);
  const int64_t size = bytes > 0 ? bytes : 1;  // a distinct pointer even for empty buffers
  void* ptr = nullptr;
  if (device == kHostDevice) {
    const int64_t rounded = (size + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    ptr = std::aligned_alloc(kHostAlignment, static_cast<size_t>(rounded));
    FOURBIT_CHECK_RUNTIME(ptr != nullptr, "paged allocation: out of host memory for bytes = ", bytes);
    std::memset(ptr, 0, static_cast<size_t>(rounded));
  } else {
    ptr = detail::managed_alloc(size, device);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  buffers_[ptr] = Entry{bytes, device};
  return ptr;
}

void PageManager::release(void* ptr) {
  Entry entry{};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = buffers_.find(ptr);
    FOURBIT_CHECK_ARG(it != buffers_.end(), "PageManager::release: ptr = ", ptr,
                      " was not allocated by the page manager");
    entry = it->second;
    buffers_.erase(it);
  }
  if (entry.device == kHostDevice) {
    std::free(ptr);
  } else {
    detail::managed_free(ptr);
  }
}

bool PageManager::owns(const void* ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return buffers_.count(const_cast<void*>(ptr)) != 0;
}

void PageManager::prefetch(const void* ptr, int64_t bytes, int device, cudaStream_t stream) {
  int owner = kHostDevice;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = buffers_.find(const_cast<void*>(ptr));
    FOURBIT_CHECK_ARG(it != buffers_.end(), "PageManager::prefetch: ptr = ", ptr,
                      " was not allocated by the page manager");
    FOURBIT_CHECK_ARG(bytes >= 0 && bytes <= it->second.bytes, "PageManager::prefetch: bytes = ",
                      bytes, " is outside the buffer's [0, ", it->second.bytes, "]");
    owner = it->second.device;
  }
  if (owner == kHostDevice || bytes == 0) return;  // host buffers never move
  detail::managed_prefetch(ptr, bytes, device, stream);
}

void PageManager::evict_all(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& kv : buffers_) {
    if (kv.second.device != kHostDevice && kv.second.bytes > 0) {
      detail::managed_prefetch(kv.first, kv.second.bytes, kHostDevice, stream);
    }
  }
}

int64_t PageManager::num_buffers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(buffers_.size());
}

int64_t PageManager::bytes_allocated() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = 0;
  for (const auto& kv : buffers_) total += kv.second.bytes;
  return total;
}

}  // namespace fourbit
