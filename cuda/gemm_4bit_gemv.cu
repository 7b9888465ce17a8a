// CUDA 4-bit gemv: Y[M, N] = X[M, K] @ deq(W)^T + bias for small M (decode, M <= 8).
// The CPU twin is the gemv path of src/gemm_4bit.cpp.
//
// At small M the product is bound by reading the packed weight (N * K / 2 bytes), so the
// kernel reads each packed byte exactly once and never writes a dequantized weight:
// one warp per weight row. Each lane first issues all its 16-byte loads of the pass
// (kLoadsPerLane x 32 codes: K = 4096 is one pass), then decodes them in registers through
// the 16-entry codebook in shared memory. The block scale (nested absmax decoded in
// registers, no second pass) is read once per warp and block by the block's first lane and
// shuffled to the others. The codes multiply-add with the activation rows in fp32 (X is
// small and stays in L1/L2); M = 1 has its own instance with one accumulator, 2..8 rows
// share one with kGemvMaxRows. A warp shuffle reduction finishes the row; lane 0 adds the
// bias and rounds once. Rows whose packed bytes are not 16-byte aligned (K % 32 != 0) take
// a per-element path that is slower but reads the same bytes. Long K with few rows (N
// below a few thousand) leaves SMs idle: split-K is not done yet.
#include <algorithm>

#include "common.cuh"
#include "gemm_4bit_kernels.cuh"
#include "weight_4bit.cuh"

namespace fourbit {
namespace cuda {
namespace {

// Warps (weight rows in flight) per CTA.
constexpr int kGemvWarps = plan::kGemvWarps;
// Codes per lane per 16-byte load.
constexpr int kChunk = 32;
// 16-byte loads of packed codes a lane issues before any math: 4 x 16 B in flight per lane
// (8 KiB per warp) covers HBM latency at 32 resident warps per SM; K = 4096 takes one pass.
constexpr int kLoadsPerLane = 4;
// Resident CTAs per SM the register budget must allow (kernel_lint.py checks it): 4 x 8
// warps = 32 warps of loads in flight per SM. fp32 activations with 2..8 rows hold 64
// activation registers per word of codes; that instance (not a QLoRA hot path: bf16/fp16
// models decode through the others) keeps 2 CTAs and one load per lane in flight.
template <typename T, int kRows>
constexpr int gemv_min_ctas_per_sm() { return sizeof(T) == 4 && kRows > 1 ? 2 : 4; }
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> __device__ __forceinline__ T from_bits(uint16_t bits);
template <> __device__ __forceinline__ __half from_bits<__half>(uint16_t bits) {
  return __ushort_as_half(bits);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint16_t bits) {
  return __ushort_as_bfloat16(bits);
}

// Eight consecutive activations of row m starting at element k (16-byte aligned) as fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&dst)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(src));
    const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 1);
    dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w;
    dst[4] = b.x; dst[5] = b.y; dst[6] = b.z; dst[7] = b.w;
  } else {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      dst[2 * j] = to_float(from_bits<T>(static_cast<uint16_t>(words[j] & 0xffffu)));
      dst[2 * j + 1] = to_float(from_bits<T>(static_cast<uint16_t>(words[j] >> 16)));
    }
  }
}

// The scale of the block holding element g, read once per warp and block: the first lane
// of the step whose chunk lies in that block (its "leader") decodes it and the others take
// it by shuffle. step_first: the first element of lane 0's chunk in this step.
__device__ __forceinline__ float warp_block_scale(const BlockScales& s, int64_t g, int64_t step_first,
                                                  int block_shift, bool valid, int lane) {
  const int64_t block = g >> block_shift;
  const int64_t block_first = block << block_shift;
  const int leader = block_first <= step_first ? 0 : static_cast<int>((block_first - step_first) >> 5);
  const float mine = (valid && leader == lane) ? block_scale(s, block) : 0.0f;
  return __shfl_sync(kFullMask, mine, leader);
}

// kRows: the activation rows this instance holds accumulators for (1: the decode case, a
// specialisation with one accumulator; kGemvMaxRows: 2..8 rows, `rows` at run time).
template <typename T, bool kVectorized, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32, (gemv_min_ctas_per_sm<T, kRows>()))
    gemv_4bit_kernel(Gemm4bitParams p, Codebook4bit code) {
  __shared__ float lut[kCodebook4bitSize];
  load_codebook(code, lut);
  const Weight4bit& w = p.weight;
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x % 32;
  const int rows = kRows == 1 ? 1 : static_cast<int>(p.M);  // <= kRows
  const int block_shift = log2_pow2(w.blocksize);  // a shift, not a 64-bit division
  // fp32 activations with several rows need their registers for X: one load in flight.
  constexpr bool kWideX = sizeof(T) == 4 && kRows > 1;
  constexpr int kLoads = kWideX ? 1 : kLoadsPerLane;
  // ... and a rolled loop over the 4 words of a load, so their activations are not all
  // hoisted into registers at once.
  constexpr int kWordUnroll = kWideX ? 1 : 4;
  for (int64_t n = blockIdx.x * (int64_t)kGemvWarps + threadIdx.x / 32; n < w.N;
       n += (int64_t)gridDim.x * kGemvWarps) {
    float acc[kRows];
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[m] = 0.0f;
    const int64_t row_start = n * w.K;
    if constexpr (kVectorized) {
      // K % 32 == 0: every chunk is one 16-byte word of packed and lies in one scale block.
      const int64_t chunks = w.K / kChunk;
      const uint4* packed = reinterpret_cast<const uint4*>(w.packed + row_start / 2);
      for (int64_t c0 = 0; c0 < chunks; c0 += 32 * kLoads) {
        uint4 raw[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {  // every load of the pass before the math
          const int64_t c = c0 + u * 32 + lane;
          raw[u] = c < chunks ? __ldg(packed + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const int64_t step = c0 + u * 32;
          const int64_t c = step + lane;
          // step < chunks is uniform across the warp: every lane reaches the shuffle.
          const float scale = step < chunks ? warp_block_scale(w.scales, row_start + c * kChunk,
                                                               row_start + step * kChunk, block_shift,
                                                               c < chunks, lane)
                                            : 0.0f;
#pragma unroll kWordUnroll
          for (int j = 0; j < 4 && c < chunks; ++j) {  // 8 codes per 32-bit word
            const uint32_t word = j == 0 ? raw[u].x : j == 1 ? raw[u].y : j == 2 ? raw[u].z : raw[u].w;
            float wv[8];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
              const uint32_t bits = (word >> (8 * b)) & 0xffu;
              wv[2 * b] = dequant_value(lut[bits >> 4], scale);
              wv[2 * b + 1] = dequant_value(lut[bits & 0x0fu], scale);
            }
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
              if (m < rows) {
                float xv[8];
                load8(x + m * w.K + c * kChunk + 8 * j, xv);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[m] = fmaf(xv[i], wv[i], acc[m]);
              }
            }
          }
        }
      }
    } else {
#pragma unroll 1
      for (int64_t k = lane; k < w.K; k += 32) {
        const int64_t g = row_start + k;
        const uint8_t bits = w.packed[g >> 1];
        const float wk = dequant_value(lut[nibble_of(bits, g)], block_scale(w.scales, g >> block_shift));
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          if (m < rows) acc[m] = fmaf(to_float(x[m * w.K + k]), wk, acc[m]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        acc[m] += __shfl_xor_sync(kFullMask, acc[m], offset);
      }
    }
    if (lane == 0) {
      const float b = bias ? to_float(bias[n]) : 0.0f;
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (m < rows) y[m * w.N + n] = from_float<T>(acc[m] + b);
      }
    }
  }
}

template <typename T, bool kVectorized>
void launch_rows(const Gemm4bitParams& p, const Codebook4bit& code, unsigned int grid,
                 cudaStream_t stream) {
  if (p.M == 1) {
    gemv_4bit_kernel<T, kVectorized, 1><<<grid, kGemvWarps * 32, 0, stream>>>(p, code);
  } else {
    gemv_4bit_kernel<T, kVectorized, kGemvMaxRows><<<grid, kGemvWarps * 32, 0, stream>>>(p, code);
  }
}

}  // namespace

void launch_gemv_4bit(const Gemm4bitParams& p_all, cudaStream_t stream) {
  const Codebook4bit code = codebook_arg(p_all.weight.quant_type);
  const int64_t elem = element_size(p_all.dtype);
  // Row groups of at most kGemvMaxRows; each group re-reads the weight (fine at small M).
  for (int64_t m0 = 0; m0 < p_all.M; m0 += kGemvMaxRows) {
    Gemm4bitParams p = p_all;
    p.M = std::min(kGemvMaxRows, p_all.M - m0);
    p.x = static_cast<const char*>(p_all.x) + m0 * p_all.weight.K * elem;
    p.y = static_cast<char*>(p_all.y) + m0 * p_all.weight.N * elem;
    const plan::GemvPlan launch = plan::plan_gemv(p.M, p.weight.N, max_grid_blocks());
    const bool vectorized = p.weight.K % kChunk == 0 && aligned_to(p.weight.packed, 16) &&
                            aligned_to(p.x, 16);
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      if (vectorized) {
        launch_rows<T, true>(p, code, launch.ctas, stream);
      } else {
        launch_rows<T, false>(p, code, launch.ctas, stream);
      }
    });
    FOURBIT_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace fourbit
