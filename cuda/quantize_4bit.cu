// CUDA 4-bit blockwise quantize / dequantize (NF4, FP4); the CPU twin is
// src/quantize_4bit.cpp and both produce identical bytes (docs/format.md).
//
// Layout: packed[j] holds elements 2j (high nibble) and 2j+1 (low nibble); block b of
// `blocksize` elements has scale absmax[b] (plain fp32, or decoded from the nested
// double-quantized form inside the kernel).
//
// Dequantize (memory bound, the hot path): a thread's item is one 8-element word, a 4-byte
// load of packed codes and one 16-byte store of bf16/fp16 (two of fp32). Consecutive
// threads take consecutive words, so every warp load reads 128 contiguous bytes and every
// warp store writes 512 contiguous bytes (no half-filled sectors). Each thread issues
// kWordsInFlight loads of its grid-stride steps before decoding any. Blocksizes are powers
// of two >= 32, so a word never straddles two scale blocks: one scale per word, decoded from
// the nested absmax in registers (no second launch). The 16-entry codebook sits in shared
// memory.
//
// Quantize: one warp per scale block; lanes take element pairs (one output byte each),
// reduce the absmax with warp shuffles, then bucket each scaled value against the 15
// midpoints exactly as the CPU twin does.
#include <cmath>

#include "common.cuh"
#include "fourbit/codebook.h"
#include "fourbit/quantize.h"
#include "weight_4bit.cuh"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kWordElements = plan::kDequantWordElements;  // one 4-byte load of codes
constexpr int kWordsInFlight = plan::kDequantWordsInFlight;
constexpr int kWarpsPerQuantizeCta = 8;
constexpr float kMinAbsmax = 1e-38f;

struct Quantizer4bitArgs {
  float midpoints[kCodebook4bitSize - 1];
  uint8_t sorted_order[kCodebook4bitSize];
};

// Packs two output elements into 32 bits (16-bit types) for vector stores.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T a, T b) {
  const uint32_t lo = *reinterpret_cast<const uint16_t*>(&a);
  const uint32_t hi = *reinterpret_cast<const uint16_t*>(&b);
  return lo | (hi << 16);
}

// Vector path: requires a 4-byte aligned `packed` and a 16-byte aligned `out`; handles only
// whole 8-element words. Thread t of the grid-stride step owns word t: consecutive lanes
// load consecutive 4-byte words (128 contiguous bytes per warp load) and store consecutive
// 16-byte runs of bf16/fp16 (512 contiguous bytes per warp store: whole sectors).
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dequantize_4bit_vec_kernel(Dequantize4bitParams p, Codebook4bit code, int64_t words) {
  __shared__ float lut[kCodebook4bitSize];
  load_codebook(code, lut);
  const int block_shift = log2_pow2(p.blocksize);  // a shift, not a 64-bit division
  const uint32_t* in = reinterpret_cast<const uint32_t*>(p.packed);
  T* out = static_cast<T*>(p.out);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
#pragma unroll 1
  for (int64_t w0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; w0 < words;
       w0 += kWordsInFlight * stride) {
    uint32_t raw[kWordsInFlight];
#pragma unroll
    for (int u = 0; u < kWordsInFlight; ++u) {  // every load before any decode
      const int64_t w = w0 + u * stride;
      raw[u] = w < words ? __ldg(in + w) : 0u;  // read-only path: each byte read once
    }
#pragma unroll
    for (int u = 0; u < kWordsInFlight; ++u) {
      const int64_t w = w0 + u * stride;
      if (w >= words) continue;
      // 8 elements never straddle a block (blocksizes are powers of two >= 32).
      const float scale = block_scale(p.scales, (w * kWordElements) >> block_shift);
      float v[kWordElements];
#pragma unroll
      for (int byte = 0; byte < 4; ++byte) {
        const uint32_t bits = (raw[u] >> (8 * byte)) & 0xffu;
        v[byte * 2] = dequant_value(lut[bits >> 4], scale);
        v[byte * 2 + 1] = dequant_value(lut[bits & 0x0fu], scale);
      }
      T* dst = out + w * kWordElements;
      if constexpr (sizeof(T) == 4) {
        float4* d4 = reinterpret_cast<float4*>(dst);
        d4[0] = make_float4(v[0], v[1], v[2], v[3]);
        d4[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        uint4 o;
        o.x = pack2(from_float<T>(v[0]), from_float<T>(v[1]));
        o.y = pack2(from_float<T>(v[2]), from_float<T>(v[3]));
        o.z = pack2(from_float<T>(v[4]), from_float<T>(v[5]));
        o.w = pack2(from_float<T>(v[6]), from_float<T>(v[7]));
        *reinterpret_cast<uint4*>(dst) = o;
      }
    }
  }
}

// Scalar path: one thread per packed byte, for [first_element, numel). Used for the
// ragged tail of the vector path and for unaligned pointers.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dequantize_4bit_scalar_kernel(Dequantize4bitParams p, Codebook4bit code, int64_t first_element) {
  __shared__ float lut[kCodebook4bitSize];
  load_codebook(code, lut);
  const int block_shift = log2_pow2(p.blocksize);
  T* out = static_cast<T*>(p.out);
  const int64_t first_byte = first_element / 2;
  const int64_t bytes = (p.numel + 1) / 2;
  // unroll 1: an unrolled grid-stride loop would compute its trip count with a 64-bit division.
#pragma unroll 1
  for (int64_t j = first_byte + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < bytes;
       j += (int64_t)gridDim.x * blockDim.x) {
    const uint8_t bits = p.packed[j];
    const int64_t i = 2 * j;
    const float scale = block_scale(p.scales, i >> block_shift);  // i, i+1 share a block
    out[i] = from_float<T>(dequant_value(lut[bits >> 4], scale));
    if (i + 1 < p.numel) out[i + 1] = from_float<T>(dequant_value(lut[bits & 0x0f], scale));
  }
}

__device__ __forceinline__ int bucket_4bit(float x, const Quantizer4bitArgs& q) {
  return detail::bucket_4bit(x, q.midpoints);
}

using detail::max_propagate_nan;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerQuantizeCta * 32)
    quantize_4bit_kernel(Quantize4bitParams p, Quantizer4bitArgs q, int64_t blocks) {
  __shared__ uint8_t sorted_order[kCodebook4bitSize];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kCodebook4bitSize; ++k) sorted_order[k] = q.sorted_order[k];
  }
  __syncthreads();
  const T* in = static_cast<const T*>(p.input);
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = (int64_t)gridDim.x * kWarpsPerQuantizeCta;
  const bool has_tail = (p.numel & (p.blocksize - 1)) != 0;  // blocksize: a power of two
  for (int64_t b = blockIdx.x * (int64_t)kWarpsPerQuantizeCta + threadIdx.x / 32; b < blocks;
       b += warps_total) {
    const int64_t start = b * p.blocksize;
    const int64_t len = min(p.blocksize, p.numel - start);
    float m = 0.0f;
    for (int64_t i = lane; i < len; i += 32) m = max_propagate_nan(m, fabsf(to_float(in[start + i])));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      m = max_propagate_nan(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    // One NaN bit pattern whatever the input's payload, like the CPU twin's std::nanf("").
    if (isnan(m)) m = __int_as_float(0x7fc00000);
    const float divisor = m < kMinAbsmax ? kMinAbsmax : m;  // keeps NaN
    const bool full = !(has_tail && b == blocks - 1);
    const float inv = __frcp_rn(divisor);
    if (lane == 0) p.absmax[b] = full ? m : divisor;
    const int pad_code = sorted_order[bucket_4bit(0.0f, q)];
    for (int64_t j = lane; 2 * j < len; j += 32) {
      const int64_t i = start + 2 * j;
      const float x0 = to_float(in[i]);
      const float s0 = full ? __fmul_rn(x0, inv) : __fdiv_rn(x0, divisor);
      const int hi = sorted_order[bucket_4bit(s0, q)];
      int lo = pad_code;
      if (2 * j + 1 < len) {
        const float x1 = to_float(in[i + 1]);
        const float s1 = full ? __fmul_rn(x1, inv) : __fdiv_rn(x1, divisor);
        lo = sorted_order[bucket_4bit(s1, q)];
      }
      p.packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

}  // namespace
}  // namespace cuda

void quantize_4bit_cuda(const Quantize4bitParams& p, cudaStream_t stream) {
  validate(p);
  if (p.numel == 0) return;
  const Quantizer4bit& host_q = quantizer_4bit(p.quant_type);
  cuda::Quantizer4bitArgs q{};
  for (int k = 0; k < kCodebook4bitSize - 1; ++k) q.midpoints[k] = host_q.midpoints[k];
  for (int k = 0; k < kCodebook4bitSize; ++k) q.sorted_order[k] = host_q.sorted_order[k];
  const int64_t blocks = num_blocks(p.numel, p.blocksize);
  const unsigned int grid = cuda::grid_for(blocks, cuda::kWarpsPerQuantizeCta);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::quantize_4bit_kernel<T>
        <<<grid, cuda::kWarpsPerQuantizeCta * 32, 0, stream>>>(p, q, blocks);
  });
  FOURBIT_CUDA_LAUNCH_CHECK();
}

void dequantize_4bit_cuda(const Dequantize4bitParams& p, cudaStream_t stream) {
  validate(p);
  if (p.numel == 0) return;
  const cuda::Codebook4bit code = cuda::codebook_arg(p.quant_type);
  const bool vectorize = cuda::aligned_to(p.packed, 4) && cuda::aligned_to(p.out, 16);
  const plan::DequantizePlan split = plan::plan_dequantize_4bit(p.numel, vectorize, cuda::max_grid_blocks());
  cuda::dispatch_dtype(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (split.vector_ctas > 0) {
      cuda::dequantize_4bit_vec_kernel<T>
          <<<split.vector_ctas, cuda::kThreadsPerBlock, 0, stream>>>(p, code, split.vector_words);
      FOURBIT_CUDA_LAUNCH_CHECK();
    }
    if (split.scalar_ctas > 0) {
      cuda::dequantize_4bit_scalar_kernel<T>
          <<<split.scalar_ctas, cuda::kThreadsPerBlock, 0, stream>>>(p, code, split.scalar_from);
      FOURBIT_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace fourbit
