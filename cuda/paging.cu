// Device half of the page manager (include/fourbit/paging.h): CUDA managed allocations,
// prefetches and cudaMemGetInfo. Managed memory lets the driver page optimizer states out to
// the host under memory pressure instead of failing; prefetching before a step moves them
// back in large, asynchronous transfers instead of page faults inside the kernel.
#include "common.cuh"
#include "fourbit/paging.h"

namespace fourbit {
namespace {

// Sets the current device for the lifetime of the object and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    FOURBIT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) FOURBIT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

bool concurrent_managed_access(int device) {
  int value = 0;
  FOURBIT_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device));
  return value != 0;
}

}  // namespace

namespace detail {

MemoryInfo device_memory_info(int device) {
  int count = 0;
  FOURBIT_CUDA_CHECK(cudaGetDeviceCount(&count));
  FOURBIT_CHECK_ARG(device >= 0 && device < count, "memory_info: device must be in [0, ", count,
                    "), got ", device);
  DeviceScope scope(device);
  size_t free_bytes = 0, total_bytes = 0;
  FOURBIT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  MemoryInfo info;
  info.free_bytes = static_cast<int64_t>(free_bytes);
  info.total_bytes = static_cast<int64_t>(total_bytes);
  return info;
}

void* managed_alloc(int64_t bytes, int device) {
  DeviceScope scope(device);
  void* ptr = nullptr;
  FOURBIT_CUDA_CHECK(cudaMallocManaged(&ptr, static_cast<size_t>(bytes), cudaMemAttachGlobal));
  // Zero on the device (the pages start out there) and finish before the buffer is handed
  // out: callers use it from any stream.
  const cudaError_t err = cudaMemset(ptr, 0, static_cast<size_t>(bytes));
  const cudaError_t sync = err == cudaSuccess ? cudaDeviceSynchronize() : err;
  if (sync != cudaSuccess) {
    cudaFree(ptr);
    FOURBIT_CUDA_CHECK(sync);
  }
  return ptr;
}

void managed_free(void* ptr) { FOURBIT_CUDA_CHECK(cudaFree(ptr)); }

void managed_prefetch(const void* ptr, int64_t bytes, int device, cudaStream_t stream) {
  // Without concurrent managed access (e.g. Windows) the driver migrates on launch anyway.
  int current = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&current));
  if (!concurrent_managed_access(device == kHostDevice ? current : device)) return;
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = device == kHostDevice ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = device == kHostDevice ? 0 : device;
  FOURBIT_CUDA_CHECK(cudaMemPrefetchAsync(ptr, static_cast<size_t>(bytes), location, 0, stream));
#else
  FOURBIT_CUDA_CHECK(cudaMemPrefetchAsync(ptr, static_cast<size_t>(bytes),
                                          device == kHostDevice ? cudaCpuDeviceId : device, stream));
#endif
}

}  // namespace detail
}  // namespace fourbit
