// The page manager: buffers for optimizer states that can live on the GPU without ever
// causing an out-of-memory spike.
//
// On a CUDA device a buffer is CUDA managed (unified) memory: the optimizer prefetches it to
// the GPU before a step, and under memory pressure the driver evicts its pages to the host
// instead of failing an allocation; evict_all() pushes them to the host on purpose. On the
// host (device kHostDevice) a buffer is plain page-aligned memory, so the same code path
// runs on CPU-only machines and in a CPU-only build.
//
// Never over-subscribe at allocation time: a request is checked against the free memory of
// its device (cudaMemGetInfo, or MemAvailable for the host) minus kPagedHeadroomBytes, and
// refused with a Runtime Error that names the request and the free memory (asking the
// driver for more managed memory than the card has free can hang the GPU). There is no
// silent fallback; the caller chooses (fourbit.optim keeps small states unpaged).
// In a CPU-only build device buffers are refused with a clear Runtime Error.
#pragma once

#include <cstdint>
#include <mutex>
#include <unordered_map>

// Same type as the CUDA runtime's cudaStream_t, so this header needs no CUDA headers.
typedef struct CUstream_st* cudaStream_t;

namespace fourbit {

// The "device" number of host memory (the CUDA runtime's cudaCpuDeviceId).
constexpr int kHostDevice = -1;

// Memory kept free on a device after any paged allocation: the CUDA context, cuBLAS
// workspaces and the caching allocator's next block need room too.
constexpr int64_t kPagedHeadroomBytes = int64_t{256} << 20;

struct MemoryInfo {
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
};

// Free and total memory of a CUDA device (cudaMemGetInfo), or of the host for kHostDevice.
MemoryInfo memory_info(int device);

// Throws a Runtime Error unless `bytes` fits into `info.free_bytes - kPagedHeadroomBytes`;
// an InvalidArgument Error for bytes < 0. `device` only names the device in the message.
void check_paged_request(int64_t bytes, const MemoryInfo& info, int device);

class PageManager {
 public:
  // The process-wide manager (thread-safe).
  static PageManager& instance();

  // A zero-filled buffer of `bytes` on `device` (managed memory) or the host (kHostDevice).
  // Checked with check_paged_request(bytes, memory_info(device), device) first.
  void* allocate(int64_t bytes, int device);
  // Frees a buffer from allocate(); throws InvalidArgument for a pointer it does not own.
  void release(void* ptr);
  // True if `ptr` is the start of a buffer from allocate().
  bool owns(const void* ptr) const;

  // Asynchronously migrates [ptr, ptr + bytes) of a managed buffer to `device` (kHostDevice:
  // to the host) on `stream`. A no-op for host buffers.
  void prefetch(const void* ptr, int64_t bytes, int device, cudaStream_t stream);
  // Prefetches every managed buffer to the host (what memory pressure would do, on purpose).
  void evict_all(cudaStream_t stream);

  int64_t num_buffers() const;
  int64_t bytes_allocated() const;

 private:
  struct Entry {
    int64_t bytes;
    int device;
  };
  mutable std::mutex mutex_;
  std::unordered_map<void*, Entry> buffers_;
};

namespace detail {
// Device half of the page manager (cuda/paging.cu, or the CPU-only build's stubs).
void* managed_alloc(int64_t bytes, int device);
void managed_free(void* ptr);
void managed_prefetch(const void* ptr, int64_t bytes, int device, cudaStream_t stream);
MemoryInfo device_memory_info(int device);
}  // namespace detail

}  // namespace fourbit
