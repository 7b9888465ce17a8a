// CPU 4-bit blockwise quantize / dequantize (NF4, FP4), bit-exact with bitsandbytes.
//
// Layout: block b covers elements [b * blocksize, min((b + 1) * blocksize, numel)); its
// fp32 scale is absmax[b]. Codes are packed two per byte, element 2j in the high nibble
// of byte j. Blocksizes are even, so every block owns whole bytes and blocks are
// processed independently, in parallel (OpenMP).
//
// Why it is fast: dequantize turns each block's 16 codebook values into a 16-entry
// table of finished output elements (scaled and converted once per block), so the inner
// loop is two table lookups and two stores per byte. Quantize compares each scaled value
// against the 15 midpoints branch-free, a loop the compiler vectorises.
#include <algorithm>
#include <cmath>

#include "dequantize_4bit_avx2.h"
#include "dequantize_4bit_avx512.h"
#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/error.h"
#include "fourbit/quantize.h"
#include "kernel_isa.h"

namespace fourbit {
namespace {

// Below this many elements the OpenMP fork costs more than it saves.
constexpr int64_t kParallelMinElements = 1 << 15;

// bitsandbytes clamps the divisor to this before scaling (an all-zero block has absmax 0).
constexpr float kMinAbsmax = 1e-38f;

inline float clamp_min_absmax(float m) { return m < kMinAbsmax ? kMinAbsmax : m; }  // keeps NaN

using detail::bucket_4bit;

template <typename T>
void quantize_block(const T* in, int64_t len, bool full_block, const Quantizer4bit& q,
                    uint8_t* packed, float* absmax_out) {
  float scaled[4096];
  // absmax with NaN propagation (torch.max semantics): one NaN makes the block's absmax NaN.
  float m = 0.0f;
  bool has_nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(detail::to_float(in[i]));
    has_nan |= std::isnan(a);
    m = detail::max_ignore_nan(m, a);
  }
  if (has_nan) m = std::nanf("");
  const float divisor = clamp_min_absmax(m);
  if (full_block) {
    // Full blocks multiply by the fp32 reciprocal; bitsandbytes stores the unclamped max.
    const float inv = 1.0f / divisor;
    for (int64_t i = 0; i < len; ++i) scaled[i] = detail::to_float(in[i]) * inv;
    *absmax_out = m;
  } else {
    // The trailing partial block divides, and stores the clamped max.
    for (int64_t i = 0; i < len; ++i) scaled[i] = detail::to_float(in[i]) / divisor;
    *absmax_out = divisor;
  }
  const float* mid = q.midpoints.data();
  const uint8_t* order = q.sorted_order.data();
  const int64_t pairs = len / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const int hi = order[bucket_4bit(scaled[2 * j], mid)];
    const int lo = order[bucket_4bit(scaled[2 * j + 1], mid)];
    packed[j] = static_cast<uint8_t>((hi << 4) | lo);
  }
  if (len % 2) {
    // Odd numel: the missing partner of the last element is encoded as 0.0.
    const int hi = order[bucket_4bit(scaled[len - 1], mid)];
    const int pad = order[bucket_4bit(0.0f, mid)];
    packed[pairs] = static_cast<uint8_t>((hi << 4) | pad);
  }
}

template <typename T>
void quantize_4bit_typed(const Quantize4bitParams& p) {
  const T* in = static_cast<const T*>(p.input);
  const Quantizer4bit& q = quantizer_4bit(p.quant_type);
  const int64_t blocks = num_blocks(p.numel, p.blocksize);
  const bool has_tail = p.numel % p.blocksize != 0;
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * p.blocksize;
    const int64_t len = std::min(p.blocksize, p.numel - start);
    const bool full = !(has_tail && b == blocks - 1);
    quantize_block(in + start, len, full, q, p.packed + start / 2, p.absmax + b);
  }
}

// Scale blocks per parallel task: enough work to amortise the scale decode and the call
// into the vector path, small enough (<= 256 x 4096 elements) to balance across threads.
constexpr int64_t kBlocksPerTask = 256;

template <typename T>
void dequantize_4bit_typed(const Dequantize4bitParams& p) {
  T* out = static_cast<T*>(p.out);
  const float* code = codebook_4bit(p.quant_type).data();
  const int64_t blocks = num_blocks(p.numel, p.blocksize);
  const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  const CpuIsa isa = detail::kernel_isa();
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinElements)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t first_block = task * kBlocksPerTask;
    const int64_t n_blocks = std::min(kBlocksPerTask, blocks - first_block);
    float scales[kBlocksPerTask];
    for (int64_t i = 0; i < n_blocks; ++i) scales[i] = detail::block_scale(p.scales, first_block + i);
    const int64_t start = first_block * p.blocksize;
    const int64_t len = std::min(n_blocks * p.blocksize, p.numel - start);
    const uint8_t* bytes = p.packed + start / 2;
    T* dst = out + start;
    // Whole 32-element chunks take the vector path where the CPU has one (AVX-512, else
    // AVX2); the rest (all of it on the portable path, else at most the ragged end of a
    // partial last block) uses a per-block table of the 16 finished output values.
    int64_t done = 0;
    if (isa >= CpuIsa::Avx512) {
      done = detail::dequantize_blocks_avx512(bytes, len, p.blocksize, scales, code, p.out_dtype, dst);
    } else if (isa == CpuIsa::Avx2) {
      done = detail::dequantize_blocks_avx2(bytes, len, p.blocksize, scales, code, p.out_dtype, dst);
    }
    while (done < len) {
      const int64_t b = done >> detail::log2_pow2(p.blocksize);
      const int64_t block_end = std::min((b + 1) * p.blocksize, len);
      T table[kCodebook4bitSize];
      for (int k = 0; k < kCodebook4bitSize; ++k) table[k] = detail::from_float<T>(detail::dequant_value(code[k], scales[b]));
      for (; done + 1 < block_end; done += 2) {
        const uint8_t byte = bytes[done / 2];
        dst[done] = table[byte >> 4];
        dst[done + 1] = table[byte & 0x0f];
      }
      if (done < block_end) {  // odd numel: the last element is a high nibble alone
        dst[done] = table[bytes[done / 2] >> 4];
        ++done;
      }
    }
  }
}

}  // namespace

void quantize_4bit(const Quantize4bitParams& p) {
  validate(p);
  if (p.numel == 0) return;
  detail::dispatch_dtype(p.dtype, [&](auto tag) { quantize_4bit_typed<decltype(tag)>(p); });
}

void dequantize_4bit(const Dequantize4bitParams& p) {
  validate(p);
  if (p.numel == 0) return;
  detail::dispatch_dtype(p.out_dtype, [&](auto tag) { dequantize_4bit_typed<decltype(tag)>(p); });
}

}  // namespace fourbit
