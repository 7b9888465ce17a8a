// CUDA 8-bit blockwise quantize / dequantize with a 256-entry sorted code; the CPU twin
// is src/quantize_blockwise.cpp and both produce identical bytes (docs/format.md).
//
// Quantize: one warp per scale block. The warp reduces absmax (fmaxf ignores NaN, as
// the CPU twin does), then each lane finds the nearest code of its values with the shared
// search (detail::nearest_code_8bit) over the code held in shared memory.
// Dequantize: one thread per element, code in shared memory; the nested-absmax users
// (4-bit dequantize) decode inside their own kernel instead of calling this.
#include "common.cuh"
#include "fourbit/codebook.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kWarpsPerCta = 8;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
    quantize_blockwise_kernel(QuantizeBlockwiseParams p, int64_t blocks) {
  __shared__ float code[kDynamicMapSize];
  for (int k = threadIdx.x; k < kDynamicMapSize; k += blockDim.x) code[k] = p.code[k];
  __syncthreads();
  const T* in = static_cast<const T*>(p.input);
  const int lane = threadIdx.x % 32;
  for (int64_t b = blockIdx.x * (int64_t)kWarpsPerCta + threadIdx.x / 32; b < blocks;
       b += (int64_t)gridDim.x * kWarpsPerCta) {
    const int64_t start = b * p.blocksize;
    const int64_t len = min(p.blocksize, p.numel - start);
    float m = 0.0f;
    for (int64_t i = lane; i < len; i += 32) m = detail::max_ignore_nan(m, fabsf(to_float(in[start + i])));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) p.absmax[b] = m;
    for (int64_t i = lane; i < len; i += 32) {
      p.out[start + i] = detail::quantize_8bit(to_float(in[start + i]), m, code);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) dequantize_blockwise_kernel(DequantizeBlockwiseParams p) {
  __shared__ float code[kDynamicMapSize];
  for (int k = threadIdx.x; k < kDynamicMapSize; k += blockDim.x) code[k] = p.code[k];
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  const int block_shift = detail::log2_pow2(p.blocksize);  // a shift, not a 64-bit division
  // unroll 1: an unrolled grid-stride loop would compute its trip count with a 64-bit division.
#pragma unroll 1
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = from_float<T>(detail::dequant_value(code[p.input[i]], p.absmax[i >> block_shift]));
  }
}

}  // namespace
}  // namespace cuda

void quantize_blockwise_cuda(const QuantizeBlockwiseParams& p, cudaStream_t stream) {
  validate(p);
  if (p.numel == 0) return;
  const int64_t blocks = num_blocks(p.numel, p.blocksize);
  const unsigned int grid = cuda::grid_for(blocks, cuda::kWarpsPerCta);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::quantize_blockwise_kernel<T><<<grid, cuda::kWarpsPerCta * 32, 0, stream>>>(p, blocks);
  });
  FOURBIT_CUDA_LAUNCH_CHECK();
}

void dequantize_blockwise_cuda(const DequantizeBlockwiseParams& p, cudaStream_t stream) {
  validate(p);
  if (p.numel == 0) return;
  const unsigned int grid = cuda::grid_for(p.numel, cuda::kThreadsPerBlock);
  cuda::dispatch_dtype(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::dequantize_blockwise_kernel<T><<<grid, cuda::kThreadsPerBlock, 0, stream>>>(p);
  });
  FOURBIT_CUDA_LAUNCH_CHECK();
}

}  // namespace fourbit
