// Device properties the launchers size their grids by (cached per device).
#include <atomic>

#include "common.cuh"

namespace fourbit {
namespace cuda {

namespace {
constexpr int kMaxDevices = 64;
// Multiprocessor count and compute capability (major * 10 + minor) per device ordinal;
// 0 = not read yet.
std::atomic<int> sm_count_cache[kMaxDevices];
std::atomic<int> capability_cache[kMaxDevices];
}  // namespace

int compute_capability() {
  int device = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&device));
  int cc = device < kMaxDevices ? capability_cache[device].load(std::memory_order_relaxed) : 0;
  if (cc == 0) {
    int major = 0, minor = 0;
    FOURBIT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    FOURBIT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cc = major * 10 + minor;
    if (device < kMaxDevices) capability_cache[device].store(cc, std::memory_order_relaxed);
  }
  return cc;
}

int max_grid_blocks() {
  int device = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < kMaxDevices ? sm_count_cache[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    FOURBIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < kMaxDevices) sm_count_cache[device].store(sms, std::memory_order_relaxed);
  }
  return static_cast<int>(plan::max_resident_ctas(sms));
}

}  // namespace cuda

bool built_with_cuda() { return true; }

}  // namespace fourbit
