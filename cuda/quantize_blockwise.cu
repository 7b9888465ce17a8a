// CUDA 8-bit blockwise quantize / dequantize with a 256-entry sorted code; the CPU twin
// is src/quantize_blockwise.cpp and both produce identical bytes (docs/format.md).
//
// Quantize: one warp per scale block. The warp reduces absmax (fmaxf ignores NaN, as
// the CPU twin does), then each lane finds the nearest code of its values with a binary
// search over the code held in shared memory (8 steps) plus one neighbour comparison.
// Dequantize: one thread per element, code in shared memory; the nested-absmax users
// (4-bit dequantize) decode inside their own kernel instead of calling this.
#include "code_search.cuh"
#include "common.cuh"
#include "fourbit/codebook.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kWarpsPerCta = 8;

// First index in code[0..256) whose value is > x (std::upper_bound).
__device__ __forceinline__ int upper_bound_256(const float* code, float x) {
  int lo = 0, count = kDynamicMapSize;
  while (count > 0) {
    const int step = count / 2;
    if (!(x < code[lo + step])) {
      lo += step + 1;
      count -= step + 1;
    } else {
      count = step;
    }
  }
  return lo;
}

__device__ __forceinline__ uint8_t nearest_code(float x, const float* code) {
  if (isnan(x)) return 0;
  int idx = max(upper_bound_256(code, x) - 1, 0);
  if (idx < kDynamicMapSize - 1) {
    const float dist_left = fabsf(__fsub_rn(x, code[idx]));
    const float dist_right = fabsf(__fsub_rn(x, code[idx + 1]));
    if (dist_right < dist_left) idx += 1;
  }
  return static_cast<uint8_t>(lower_bound_256(code, code[idx]));
}

template <typename T>
__global__ void quantize_blockwise_kernel(QuantizeBlockwiseParams p, int64_t blocks) {
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
    for (int64_t i = lane; i < len; i += 32) m = fmaxf(m, fabsf(to_float(in[start + i])));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) p.absmax[b] = m;
    for (int64_t i = lane; i < len; i += 32) {
      p.out[start + i] = nearest_code(__fdiv_rn(to_float(in[start + i]), m), code);
    }
  }
}

template <typename T>
__global__ void dequantize_blockwise_kernel(DequantizeBlockwiseParams p) {
  __shared__ float code[kDynamicMapSize];
  for (int k = threadIdx.x; k < kDynamicMapSize; k += blockDim.x) code[k] = p.code[k];
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = from_float<T>(__fmul_rn(code[p.input[i]], p.absmax[i / p.blocksize]));
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
