// Device properties the launchers size their grids by.
#include "common.cuh"

namespace fourbit {
namespace cuda {

int max_grid_blocks() {
  int device = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&device));
  int sms = 0;
  FOURBIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // 32 CTAs of 256 threads per SM: several waves of full occupancy for grid-stride loops.
  return sms * 32;
}

}  // namespace cuda
}  // namespace fourbit

namespace fourbit {
bool built_with_cuda() { return true; }
}  // namespace fourbit
