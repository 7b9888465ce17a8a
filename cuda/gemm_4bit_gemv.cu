// CUDA 4-bit gemv: Y[M, N] = X[M, K] @ deq(W)^T + bias for small M (decode, M <= 8).
// The CPU twin is the gemv path of src/gemm_4bit.cpp.
//
// At small M the product is bound by reading the packed weight (N * K / 2 bytes), so the
// kernel reads each packed byte exactly once and never writes a dequantized weight:
// one warp per weight row; each lane loads 16 bytes (32 codes) with one 128-bit load,
// decodes them in registers through the 16-entry codebook in shared memory and the block
// scale (the nested absmax is decoded in the same registers, no second pass), and
// multiply-adds them with up to kGemvMaxRows activation rows in fp32 (X is small and stays
// in L1/L2). A warp shuffle reduction finishes the row; lane 0 adds the bias and rounds
// once. Rows whose packed bytes are not 16-byte aligned (K % 32 != 0) take a per-element
// path that is slower but reads the same bytes.
#include <algorithm>

#include "common.cuh"
#include "gemm_4bit_kernels.cuh"
#include "weight_4bit.cuh"

namespace fourbit {
namespace cuda {
namespace {

// Warps (weight rows in flight) per CTA.
constexpr int kGemvWarps = 8;
// Codes per lane per step: one 16-byte load.
constexpr int kChunk = 32;

template <typename T> __device__ __forceinline__ T from_bits(uint16_t bits);
template <> __device__ __forceinline__ __half from_bits<__half>(uint16_t bits) {
  return __ushort_as_half(bits);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint16_t bits) {
  return __ushort_as_bfloat16(bits);
}

// Loads 32 consecutive activations as fp32 from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, float* dst) {
  if constexpr (sizeof(T) == 4) {
    const float4* s = reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int i = 0; i < kChunk / 4; ++i) {
      const float4 v = __ldg(s + i);
      dst[4 * i] = v.x;
      dst[4 * i + 1] = v.y;
      dst[4 * i + 2] = v.z;
      dst[4 * i + 3] = v.w;
    }
  } else {
    const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int i = 0; i < kChunk / 8; ++i) {
      const uint4 v = __ldg(s + i);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dst[8 * i + 2 * j] = to_float(from_bits<T>(static_cast<uint16_t>(words[j] & 0xffffu)));
        dst[8 * i + 2 * j + 1] = to_float(from_bits<T>(static_cast<uint16_t>(words[j] >> 16)));
      }
    }
  }
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_4bit_kernel(Gemm4bitParams p, Codebook4bit code) {
  __shared__ float lut[kCodebook4bitSize];
  load_codebook(code, lut);
  const Weight4bit& w = p.weight;
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x % 32;
  const int rows = static_cast<int>(p.M);  // <= kGemvMaxRows
  const int block_shift = log2_pow2(w.blocksize);  // a shift, not a 64-bit division
  for (int64_t n = blockIdx.x * (int64_t)kGemvWarps + threadIdx.x / 32; n < w.N;
       n += (int64_t)gridDim.x * kGemvWarps) {
    float acc[kGemvMaxRows];
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) acc[m] = 0.0f;
    const int64_t row_start = n * w.K;
    if constexpr (kVectorized) {
      // K % 32 == 0: every chunk starts a 16-byte word of packed and lies in one block.
      const int64_t chunks = w.K / kChunk;
#pragma unroll 2
      for (int64_t c = lane; c < chunks; c += 32) {
        const int64_t g = row_start + c * kChunk;
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(w.packed + g / 2));
        const float scale = block_scale(w.scales, g >> block_shift);
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        float wv[kChunk];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const uint32_t bits = (words[j] >> (8 * b)) & 0xffu;
            wv[8 * j + 2 * b] = dequant_value(lut[bits >> 4], scale);
            wv[8 * j + 2 * b + 1] = dequant_value(lut[bits & 0x0fu], scale);
          }
        }
#pragma unroll
        for (int m = 0; m < kGemvMaxRows; ++m) {
          if (m < rows) {
            float xv[kChunk];
            load_chunk(x + m * w.K + c * kChunk, xv);
#pragma unroll
            for (int i = 0; i < kChunk; ++i) acc[m] = fmaf(xv[i], wv[i], acc[m]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < w.K; k += 32) {
        const int64_t g = row_start + k;
        const uint8_t bits = w.packed[g >> 1];
        const float wk = dequant_value(lut[nibble_of(bits, g)], block_scale(w.scales, g >> block_shift));
#pragma unroll
        for (int m = 0; m < kGemvMaxRows; ++m) {
          if (m < rows) acc[m] = fmaf(to_float(x[m * w.K + k]), wk, acc[m]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
      }
    }
    if (lane == 0) {
      const float b = bias ? to_float(bias[n]) : 0.0f;
#pragma unroll
      for (int m = 0; m < kGemvMaxRows; ++m) {
        if (m < rows) y[m * w.N + n] = from_float<T>(acc[m] + b);
      }
    }
  }
}

}  // namespace

void launch_gemv_4bit(const Gemm4bitParams& p_all, cudaStream_t stream) {
  const Codebook4bit code = codebook_arg(p_all.weight.quant_type);
  const int64_t elem = element_size(p_all.dtype);
  const unsigned int grid = grid_for(p_all.weight.N, kGemvWarps);
  // Row groups of at most kGemvMaxRows; each group re-reads the weight (fine at small M).
  for (int64_t m0 = 0; m0 < p_all.M; m0 += kGemvMaxRows) {
    Gemm4bitParams p = p_all;
    p.M = std::min(kGemvMaxRows, p_all.M - m0);
    p.x = static_cast<const char*>(p_all.x) + m0 * p_all.weight.K * elem;
    p.y = static_cast<char*>(p_all.y) + m0 * p_all.weight.N * elem;
    const bool vectorized = p.weight.K % kChunk == 0 && aligned_to(p.weight.packed, 16) &&
                            aligned_to(p.x, 16);
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      if (vectorized) {
        gemv_4bit_kernel<T, true><<<grid, kGemvWarps * 32, 0, stream>>>(p, code);
      } else {
        gemv_4bit_kernel<T, false><<<grid, kGemvWarps * 32, 0, stream>>>(p, code);
      }
    });
    FOURBIT_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace fourbit
