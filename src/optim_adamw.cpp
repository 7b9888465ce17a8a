// CPU AdamW step over a table of tensors: 32-bit states, and 8-bit blockwise states that are
// dequantized, updated in fp32 and requantized in the same pass (include/fourbit/optim.h).
//
// Why it is fast:
//  - One OpenMP region per call for the whole table (a parameter group): the tensors are cut
//    into chunks of kChunkElements and the threads share the flat list of all chunks, so
//    hundreds of small LoRA tensors cost one fork/join, not one each.
//  - Each chunk is processed one 256-element block at a time: the block's param, grad and
//    both moments sit in L1 for the whole update (one pass over memory per step).
//  - On AVX-512 CPUs the arithmetic runs 16 lanes wide, and the 8-bit requantization is a
//    branchless 8-step binary search over the sorted 256-entry map done with gathers from
//    L1 (16 values per instruction), instead of one scalar search per value.
//
// Arithmetic (identical in the AVX-512, portable and CUDA paths; docs/kernels.md):
//   32-bit: m = fma(1-b1, g - m, m)            (torch's lerp, weight < 0.5; else
//                                               fma(-b1, g - m, g))
//           v = fma((1-b2) * g, g, v * b2)     (torch's mul_ + addcmul_)
//   8-bit:  m = m * b1 + g * (1-b1),  v = v * b2 + (1-b2) * (g * g)   (bitsandbytes)
//   both:   p = p * (1 - lr*wd);  p = p + (-step_size * m) / (sqrt(v) + eps')
//           with step_size = lr * sqrt(1-b2^t) / (1-b1^t), eps' = eps * sqrt(1-b2^t)
//           (bitsandbytes' form: one sqrt and one division, the CPU's bottleneck)
// sqrt and division are IEEE (correctly rounded); with the library's -ffp-contract=off the
// only FMAs are the explicit ones above.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/optim.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 headers trip these on their own _mm512_undefined_*.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define FOURBIT_OPTIM_AVX512 1
#define FOURBIT_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#endif

namespace fourbit {
namespace {

constexpr int64_t kBlock = kAdamW8bitBlocksize;
// 16 blocks (64 KiB of fp32 param + grad + states) per task: big enough to amortise the
// scheduling, small enough that a 42M-parameter group splits into thousands of tasks.
constexpr int64_t kChunkElements = 16 * kBlock;
// Below this many elements in the whole table, threads cost more than they save.
constexpr int64_t kParallelMinElements = 1 << 15;
// Non-finite gradients: the 8-bit requantization takes each block's absmax over its finite
// moments only, so that a non-finite gradient element (which makes its own moments inf or
// NaN) stays confined to its own parameter, as in torch.optim.AdamW, instead of turning the
// absmax of its block into inf and every parameter of the block into NaN on the next step
// (bitsandbytes lets the inf through). An inf moment is stored as the map's end code, a NaN
// one as code 0; the parameter itself is already NaN, as torch's would be.

using detail::AdamWCoefficients;

bool use_avx512() {
#ifdef FOURBIT_OPTIM_AVX512
  // FOURBIT_DISABLE_AVX512=1 forces the portable path (the tests run both).
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                          std::getenv("FOURBIT_DISABLE_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

// Monotone map from fp32 to uint32 (x < y  <=>  key(x) < key(y) for non-NaN values).
inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float from_order_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// A 256-entry sorted map, prepared for the two search paths.
//
// Portable path: detail::nearest_code_8bit, the search the CUDA kernel runs.
//
// AVX-512 path: the nearest-code rule is a monotone step function of x, so it is fully
// described by 255 thresholds: T[k] = the smallest fp32 x whose code is >= k (found once per
// map by bisection over fp32 bit patterns with the scalar rule itself), and
// code(x) = #{k >= 1 : T[k] <= x}, NaN -> 0. That count is an 8-level branchless binary
// search whose level-L probes (2^L candidates) live in registers: levels 0-4 take one
// permute, level 5 a two-register permute, levels 6 and 7 two and four of them plus blends.
// No gathers, no memory lookups: ~35 register instructions per 16 values.
struct Map8bit {
  const float* code = nullptr;
  std::array<float, kDynamicMapSize> values{};  // a copy of the map (the cache owns it)
  // levels[L][i] = T[(2i + 1) * (128 >> L)], with T[0] = -inf; 128 floats per level.
  alignas(64) float levels[8][128] = {};
  bool has_thresholds = false;

  void init(const float* c, bool want_thresholds);
};

// ------------------------------------------------------------------ portable scalar path

// Nearest code to x (ties to the lower index, duplicates to their first index, NaN -> 0):
// quantize_blockwise's rule, from the shared element math.
inline uint8_t nearest_code(float x, const Map8bit& map) { return detail::nearest_code_8bit(x, map.code); }

void Map8bit::init(const float* c, bool want_thresholds) {
  std::memcpy(values.data(), c, sizeof(float) * kDynamicMapSize);
  code = values.data();
  if (!want_thresholds) return;
  std::array<float, kDynamicMapSize> T;
  T[0] = -INFINITY;
  const uint32_t key_lo = order_key(-INFINITY), key_hi = order_key(INFINITY);
  for (int k = 1; k < kDynamicMapSize; ++k) {
    // Smallest key in [key_lo, key_hi] whose code is >= k (code(+inf) = 255 >= k).
    uint32_t lo = key_lo, hi = key_hi;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (nearest_code(from_order_key(mid), *this) >= k) hi = mid; else lo = mid + 1;
    }
    T[k] = from_order_key(lo);
  }
  for (int L = 0; L < 8; ++L) {
    const int step = 128 >> L;
    for (int i = 0; i < (1 << L); ++i) levels[L][i] = T[(2 * i + 1) * step];
  }
  has_thresholds = true;
}

// The prepared map for `code` (built once per distinct map content and kept: building the
// bucket table costs about a millisecond, a step of a small group much less).
std::shared_ptr<const Map8bit> prepared_map(const float* code, bool want_thresholds, const char* name) {
  if (code == nullptr) return std::make_shared<Map8bit>();
  constexpr size_t kMaxCached = 8;  // two maps per optimizer; a few distinct maps at most
  static std::mutex mutex;
  static std::vector<std::shared_ptr<Map8bit>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& m : cache) {
    if (std::memcmp(m->values.data(), code, sizeof(float) * kDynamicMapSize) == 0 &&
        (!want_thresholds || m->has_thresholds)) {
      return m;
    }
  }
  // A new map is checked once, here: the nearest-code search needs it sorted (NaN fails too).
  for (int k = 0; k + 1 < kDynamicMapSize; ++k) {
    FOURBIT_CHECK_ARG(code[k] <= code[k + 1], "adamw: ", name, " must be sorted ascending, but ",
                      name, "[", k, "] = ", code[k], " > ", name, "[", k + 1, "] = ", code[k + 1]);
  }
  if (cache.size() >= kMaxCached) cache.erase(cache.begin());  // callers keep their shared_ptr
  auto m = std::make_shared<Map8bit>();
  m->init(code, want_thresholds);
  cache.push_back(m);
  return m;
}

// ------------------------------------------------------------------ portable scalar path

// One block of the update on fp32 arrays, in place. p and g hold `len` values; m and v are
// the (dequantized) moments. `bits8` picks the state formula (see the file comment).
void update_block_scalar(float* p, const float* g, float* m, float* v, int64_t len,
                         const AdamWCoefficients& c, bool bits8) {
  const detail::AdamWLerp lerp = detail::adamw_lerp(c);
  for (int64_t i = 0; i < len; ++i) detail::adamw_update(p[i], g[i], m[i], v[i], c, lerp, bits8);
}

// absmax (over finite moments only) and codes of one block of fp32 states.
void quantize_block_scalar(const float* s, int64_t len, const Map8bit& map, uint8_t* out,
                           float* absmax) {
  float am = 0.0f;
  for (int64_t i = 0; i < len; ++i) am = detail::max_abs_finite(am, s[i]);
  *absmax = am;
  for (int64_t i = 0; i < len; ++i) out[i] = detail::quantize_8bit(s[i], am, map.code);
}

// ------------------------------------------------------------------ AVX-512 path
#ifdef FOURBIT_OPTIM_AVX512

// 16 lanes of the update; masked loads and stores only in the last partial vector (AMD
// cores run masked full-width stores much slower than plain ones).
template <bool Bits8, bool Tail>
FOURBIT_AVX512_FN inline void update16(float* p, const float* g, float* m, float* v, __mmask16 k,
                                       const AdamWCoefficients& c, bool small_weight) {
  const __m512 gi = Tail ? _mm512_maskz_loadu_ps(k, g) : _mm512_loadu_ps(g);
  __m512 mi = Tail ? _mm512_maskz_loadu_ps(k, m) : _mm512_loadu_ps(m);
  __m512 vi = Tail ? _mm512_maskz_loadu_ps(k, v) : _mm512_loadu_ps(v);
  const __m512 pin = Tail ? _mm512_maskz_loadu_ps(k, p) : _mm512_loadu_ps(p);
  if (Bits8) {
    mi = _mm512_add_ps(_mm512_mul_ps(mi, _mm512_set1_ps(c.beta1)), _mm512_mul_ps(gi, _mm512_set1_ps(c.one_minus_beta1)));
    vi = _mm512_add_ps(_mm512_mul_ps(vi, _mm512_set1_ps(c.beta2)),
                       _mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta2), _mm512_mul_ps(gi, gi)));
  } else {
    const __m512 lerp_coeff = _mm512_set1_ps(small_weight ? c.one_minus_beta1 : c.one_minus_beta1 - 1.0f);
    mi = _mm512_fmadd_ps(lerp_coeff, _mm512_sub_ps(gi, mi), small_weight ? mi : gi);
    vi = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta2), gi), gi,
                         _mm512_mul_ps(vi, _mm512_set1_ps(c.beta2)));
  }
  const __m512 denom = _mm512_add_ps(_mm512_sqrt_ps(vi), _mm512_set1_ps(c.eps_scaled));
  const __m512 pi = _mm512_mul_ps(pin, _mm512_set1_ps(c.decay));
  const __m512 pout = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(c.neg_step_size), mi), denom));
  if (Tail) {
    _mm512_mask_storeu_ps(p, k, pout);
    _mm512_mask_storeu_ps(m, k, mi);
    _mm512_mask_storeu_ps(v, k, vi);
  } else {
    _mm512_storeu_ps(p, pout);
    _mm512_storeu_ps(m, mi);
    _mm512_storeu_ps(v, vi);
  }
}

template <bool Bits8>
FOURBIT_AVX512_FN void update_block_avx512_t(float* p, const float* g, float* m, float* v, int64_t len,
                                             const AdamWCoefficients& c) {
  const bool small_weight = std::fabs(c.one_minus_beta1) < 0.5f;
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) update16<Bits8, false>(p + i, g + i, m + i, v + i, 0xffff, c, small_weight);
  if (i < len) {
    const __mmask16 k = static_cast<__mmask16>((1u << (len - i)) - 1u);
    update16<Bits8, true>(p + i, g + i, m + i, v + i, k, c, small_weight);
  }
}

FOURBIT_AVX512_FN void update_block_avx512(float* p, const float* g, float* m, float* v,
                                           int64_t len, const AdamWCoefficients& c, bool bits8) {
  if (bits8) {
    update_block_avx512_t<true>(p, g, m, v, len, c);
  } else {
    update_block_avx512_t<false>(p, g, m, v, len, c);
  }
}

// The 8 probe levels of a map in registers (levels 0-3 padded into one register each).
struct Levels {
  __m512 l0, l1, l2, l3, l4, l5[2], l6[4], l7[8];
};

FOURBIT_AVX512_FN inline Levels load_levels(const Map8bit& map) {
  Levels v;
  v.l0 = _mm512_set1_ps(map.levels[0][0]);
  v.l1 = _mm512_load_ps(map.levels[1]);
  v.l2 = _mm512_load_ps(map.levels[2]);
  v.l3 = _mm512_load_ps(map.levels[3]);
  v.l4 = _mm512_load_ps(map.levels[4]);
  for (int r = 0; r < 2; ++r) v.l5[r] = _mm512_load_ps(map.levels[5] + 16 * r);
  for (int r = 0; r < 4; ++r) v.l6[r] = _mm512_load_ps(map.levels[6] + 16 * r);
  for (int r = 0; r < 8; ++r) v.l7[r] = _mm512_load_ps(map.levels[7] + 16 * r);
  return v;
}

// pos += step in the lanes where probe <= x.
FOURBIT_AVX512_FN inline void advance_if_le(__m512i& pos, __m512 probe, __m512 x, int step) {
  pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(probe, x, _CMP_LE_OQ), pos, _mm512_set1_epi32(step));
}

// code(x) = #{k >= 1 : T[k] <= x} by the 8-level search (NaN: every compare false -> 0).
FOURBIT_AVX512_FN inline __m512i search_levels(__m512 x, const Levels& v) {
  __m512i pos = _mm512_setzero_si512();
#define advance(probe, step) advance_if_le(pos, (probe), x, (step))
  advance(v.l0, 128);
  advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 7), v.l1), 64);
  advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 6), v.l2), 32);
  advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 5), v.l3), 16);
  advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 4), v.l4), 8);
  advance(_mm512_permutex2var_ps(v.l5[0], _mm512_srli_epi32(pos, 3), v.l5[1]), 4);
  {
    const __m512i i = _mm512_srli_epi32(pos, 2);  // 0..63
    const __m512 a = _mm512_permutex2var_ps(v.l6[0], i, v.l6[1]);
    const __m512 b = _mm512_permutex2var_ps(v.l6[2], i, v.l6[3]);
    advance(_mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), a, b), 2);
  }
  {
    const __m512i i = _mm512_srli_epi32(pos, 1);  // 0..127
    const __m512 a = _mm512_permutex2var_ps(v.l7[0], i, v.l7[1]);
    const __m512 b = _mm512_permutex2var_ps(v.l7[2], i, v.l7[3]);
    const __m512 c = _mm512_permutex2var_ps(v.l7[4], i, v.l7[5]);
    const __m512 d = _mm512_permutex2var_ps(v.l7[6], i, v.l7[7]);
    const __mmask16 b5 = _mm512_test_epi32_mask(i, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(i, _mm512_set1_epi32(64));
    const __m512 lowhalf = _mm512_mask_blend_ps(b5, a, b);
    const __m512 highhalf = _mm512_mask_blend_ps(b5, c, d);
    advance(_mm512_mask_blend_ps(b6, lowhalf, highhalf), 1);
  }
#undef advance
  return pos;
}

// out[i] = code[codes[i]] * absmax for one block: the 256-entry map sits in 16 registers and
// each lookup is 8 two-register permutes (32 entries each) merged by index bits 5-7.
FOURBIT_AVX512_FN void dequantize_block_avx512(const uint8_t* codes, int64_t len, const Map8bit& map,
                                               float absmax, float* out) {
  __m512 r[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(map.code + 16 * j);
  const __m512 scale = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 k = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1u);
    const __m512i idx = _mm512_cvtepu8_epi32(k == 0xffff ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i))
                                                         : _mm_maskz_loadu_epi8(k, codes + i));
    __m512 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm512_permutex2var_ps(r[2 * j], idx, r[2 * j + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    const __m512 c0 = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, a[0], a[1]), _mm512_mask_blend_ps(b5, a[2], a[3]));
    const __m512 c1 = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, a[4], a[5]), _mm512_mask_blend_ps(b5, a[6], a[7]));
    const __m512 value = _mm512_mul_ps(_mm512_mask_blend_ps(b7, c0, c1), scale);
    if (k == 0xffff) {
      _mm512_storeu_ps(out + i, value);  // masked stores are slow on AMD: only for the tail
    } else {
      _mm512_mask_storeu_ps(out + i, k, value);
    }
  }
}

FOURBIT_AVX512_FN void quantize_block_avx512(const float* s, int64_t len, const Map8bit& map,
                                             uint8_t* out, float* absmax) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 k = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1u);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, s + i));
    // NaN and inf lanes keep acc: finite only ("Non-finite gradients" above).
    acc = _mm512_mask_max_ps(acc, _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_LT_OQ), a, acc);
  }
  const float am = _mm512_reduce_max_ps(acc);
  *absmax = am;
  const __m512 amv = _mm512_set1_ps(am);
  const Levels lv = load_levels(map);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 k = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1u);
    const __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(k, s + i), amv);
    const __m512i idx = search_levels(x, lv);
    if (k == 0xffff) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(idx));
    } else {
      _mm_mask_storeu_epi8(out + i, k, _mm512_cvtepi32_epi8(idx));
    }
  }
}

#endif  // FOURBIT_OPTIM_AVX512

// ------------------------------------------------------------------ one chunk of one tensor

struct TensorJob {
  const AdamWTensor* t;
  AdamWCoefficients coeff;
  int64_t first_chunk;  // index of this tensor's first chunk in the flat chunk list
};

template <typename T>
void load_floats(const T* src, float* dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = detail::to_float(src[i]);
}

template <typename T>
void store_floats(const float* src, T* dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = detail::from_float<T>(src[i]);
}

template <typename T>
void run_chunk(const TensorJob& job, int64_t chunk, const Map8bit& map1, const Map8bit& map2,
               bool avx512) {
  const AdamWTensor& t = *job.t;
  const bool bits8 = t.bits == StateBits::Bits8;
  const int64_t begin = chunk * kChunkElements;
  const int64_t end = std::min(t.numel, begin + kChunkElements);
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  alignas(64) float pbuf[kBlock], gbuf[kBlock], mbuf[kBlock], vbuf[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t len = std::min(kBlock, end - start);
    // Params and grads of fp32 tensors are used in place; others go through fp32 buffers.
    float* p = pbuf;
    const float* g = gbuf;
    if constexpr (std::is_same_v<T, float>) {
      p = param + start;
      g = grad + start;
    } else {
      load_floats(param + start, pbuf, len);
      load_floats(grad + start, gbuf, len);
    }
    float* m = mbuf;
    float* v = vbuf;
    const int64_t b = start / kBlock;
    if (bits8) {
      const uint8_t* c1 = static_cast<const uint8_t*>(t.state1) + start;
      const uint8_t* c2 = static_cast<const uint8_t*>(t.state2) + start;
      const float a1 = t.absmax1[b], a2 = t.absmax2[b];
#ifdef FOURBIT_OPTIM_AVX512
      if (avx512) {
        dequantize_block_avx512(c1, len, map1, a1, mbuf);
        dequantize_block_avx512(c2, len, map2, a2, vbuf);
      } else
#endif
      {
        for (int64_t i = 0; i < len; ++i) {
          mbuf[i] = map1.code[c1[i]] * a1;
          vbuf[i] = map2.code[c2[i]] * a2;
        }
      }
    } else {
      m = static_cast<float*>(t.state1) + start;
      v = static_cast<float*>(t.state2) + start;
    }
#ifdef FOURBIT_OPTIM_AVX512
    if (avx512) {
      update_block_avx512(p, g, m, v, len, job.coeff, bits8);
    } else
#endif
    {
      update_block_scalar(p, g, m, v, len, job.coeff, bits8);
    }
    if constexpr (!std::is_same_v<T, float>) store_floats(pbuf, param + start, len);
    if (bits8) {
      uint8_t* c1 = static_cast<uint8_t*>(t.state1) + start;
      uint8_t* c2 = static_cast<uint8_t*>(t.state2) + start;
#ifdef FOURBIT_OPTIM_AVX512
      if (avx512) {
        quantize_block_avx512(mbuf, len, map1, c1, t.absmax1 + b);
        quantize_block_avx512(vbuf, len, map2, c2, t.absmax2 + b);
        continue;
      }
#endif
      quantize_block_scalar(mbuf, len, map1, c1, t.absmax1 + b);
      quantize_block_scalar(vbuf, len, map2, c2, t.absmax2 + b);
    }
  }
  (void)avx512;
}

// ------------------------------------------------------------------ validation helpers

void check_finite(double v, const char* name) {
  FOURBIT_CHECK_ARG(std::isfinite(v), "adamw: ", name, " must be finite, got ", v);
}

void check_ptr(const void* ptr, int64_t numel, int64_t i, const char* name) {
  FOURBIT_CHECK_ARG(numel == 0 || ptr != nullptr, "adamw: tensors[", i, "].", name,
                    " is null but numel is ", numel);
}

}  // namespace

// ------------------------------------------------------------------ public API

namespace detail {

AdamWCoefficients adamw_coefficients(const AdamWHyperParams& h, int64_t step) {
  // Python evaluates these in double and torch rounds each scalar operand to fp32 once.
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(h.beta1, t);
  const double bc2 = 1.0 - std::pow(h.beta2, t);
  AdamWCoefficients c;
  c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.beta1 = static_cast<float>(h.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  const double bc2_sqrt = std::sqrt(bc2);
  c.eps_scaled = static_cast<float>(h.eps * bc2_sqrt);
  c.neg_step_size = static_cast<float>(-(h.lr * bc2_sqrt / bc1));
  return c;
}

namespace {
// The fields every single-tensor call shares.
template <typename Params>
AdamWTensor common_entry(const Params& p, StateBits bits) {
  AdamWTensor t;
  t.param = p.param;
  t.grad = p.grad;
  t.dtype = p.dtype;
  t.bits = bits;
  t.numel = p.numel;
  t.step = p.step;
  return t;
}
}  // namespace

AdamWTensor as_table_entry(const AdamW32bitParams& p) {
  AdamWTensor t = common_entry(p, StateBits::Bits32);
  t.state1 = p.exp_avg;
  t.state2 = p.exp_avg_sq;
  return t;
}

AdamWTensor as_table_entry(const AdamW8bitParams& p) {
  AdamWTensor t = common_entry(p, StateBits::Bits8);
  t.state1 = p.state1;
  t.state2 = p.state2;
  t.absmax1 = p.absmax1;
  t.absmax2 = p.absmax2;
  return t;
}

}  // namespace detail

void validate(const AdamWHyperParams& h) {
  check_finite(h.lr, "lr");
  FOURBIT_CHECK_ARG(h.lr >= 0.0, "adamw: lr must be >= 0, got ", h.lr);
  check_finite(h.beta1, "beta1");
  FOURBIT_CHECK_ARG(h.beta1 >= 0.0 && h.beta1 < 1.0, "adamw: beta1 must be in [0, 1), got ",
                    h.beta1);
  check_finite(h.beta2, "beta2");
  FOURBIT_CHECK_ARG(h.beta2 >= 0.0 && h.beta2 < 1.0, "adamw: beta2 must be in [0, 1), got ",
                    h.beta2);
  check_finite(h.eps, "eps");
  FOURBIT_CHECK_ARG(h.eps > 0.0, "adamw: eps must be > 0, got ", h.eps);
  check_finite(h.weight_decay, "weight_decay");
  FOURBIT_CHECK_ARG(h.weight_decay >= 0.0, "adamw: weight_decay must be >= 0, got ",
                    h.weight_decay);
}

void validate(const AdamWMultiTensorParams& p) {
  validate(p.hyper);
  FOURBIT_CHECK_ARG(p.num_tensors >= 0, "adamw: num_tensors must be >= 0, got ", p.num_tensors);
  FOURBIT_CHECK_ARG(p.num_tensors == 0 || p.tensors != nullptr,
                    "adamw: tensors is null but num_tensors is ", p.num_tensors);
  bool any8 = false;
  int64_t total = 0;
  for (int64_t i = 0; i < p.num_tensors; ++i) {
    const AdamWTensor& t = p.tensors[i];
    FOURBIT_CHECK_ARG(t.numel >= 0, "adamw: tensors[", i, "].numel must be >= 0, got ", t.numel);
    FOURBIT_CHECK_ARG(t.numel <= INT64_MAX / 4, "adamw: tensors[", i, "].numel = ", t.numel,
                      " is too large (the bytes of its fp32 states overflow int64)");
    FOURBIT_CHECK_ARG(!__builtin_add_overflow(total, t.numel, &total), "adamw: the total numel of "
                      "the table overflows int64 at tensors[", i, "] (numel ", t.numel, ")");
    FOURBIT_CHECK_ARG(t.step >= 1, "adamw: tensors[", i, "].step must be >= 1, got ", t.step);
    const int d = static_cast<int>(t.dtype);
    FOURBIT_CHECK_ARG(d >= 0 && d <= 2, "adamw: tensors[", i,
                      "].dtype must be float32, float16 or bfloat16, got enum value ", d);
    const int b = static_cast<int>(t.bits);
    FOURBIT_CHECK_ARG(b == 32 || b == 8, "adamw: tensors[", i, "].bits must be 32 or 8, got ", b);
    check_ptr(t.param, t.numel, i, "param");
    check_ptr(t.grad, t.numel, i, "grad");
    check_ptr(t.state1, t.numel, i, "state1");
    check_ptr(t.state2, t.numel, i, "state2");
    if (t.bits == StateBits::Bits8) {
      any8 = any8 || t.numel > 0;
      check_ptr(t.absmax1, t.numel, i, "absmax1");
      check_ptr(t.absmax2, t.numel, i, "absmax2");
    }
  }
  if (any8) {
    FOURBIT_CHECK_ARG(p.qmap1 != nullptr, "adamw: qmap1 is null but some tensors have 8-bit states");
    FOURBIT_CHECK_ARG(p.qmap2 != nullptr, "adamw: qmap2 is null but some tensors have 8-bit states");
  }
}

void validate(const AdamW32bitParams& p) {
  detail::with_one_tensor_table(
      p, [&](const AdamWMultiTensorParams& mp) { validate(mp); });
}

void validate(const AdamW8bitParams& p) {
  detail::with_one_tensor_table(
      p, [&](const AdamWMultiTensorParams& mp) { validate(mp); });
}

void adamw_step(const AdamWMultiTensorParams& p) {
  validate(p);
  // The flat list of chunks of all tensors: jobs[j].first_chunk is a prefix sum.
  std::vector<TensorJob> jobs;
  jobs.reserve(static_cast<size_t>(p.num_tensors));
  int64_t total_chunks = 0, total_elements = 0;
  for (int64_t i = 0; i < p.num_tensors; ++i) {
    const AdamWTensor& t = p.tensors[i];
    if (t.numel == 0) continue;
    jobs.push_back({&t, detail::adamw_coefficients(p.hyper, t.step), total_chunks});
    total_chunks += (t.numel + kChunkElements - 1) / kChunkElements;
    total_elements += t.numel;
  }
  if (jobs.empty()) return;
  const bool avx512 = use_avx512();
  const std::shared_ptr<const Map8bit> map1 = prepared_map(p.qmap1, avx512, "qmap1");
  const std::shared_ptr<const Map8bit> map2 = prepared_map(p.qmap2, avx512, "qmap2");
#pragma omp parallel for schedule(static) if (total_elements >= kParallelMinElements)
  for (int64_t c = 0; c < total_chunks; ++c) {
    // The tensor whose chunk range holds c: last job with first_chunk <= c.
    const auto it = std::upper_bound(jobs.begin(), jobs.end(), c,
                                     [](int64_t v, const TensorJob& j) { return v < j.first_chunk; });
    const TensorJob& job = *(it - 1);
    const int64_t local = c - job.first_chunk;
    detail::dispatch_dtype(job.t->dtype, [&](auto tag) {
      run_chunk<decltype(tag)>(job, local, *map1, *map2, avx512);
    });
  }
}

void adamw_step_32bit(const AdamW32bitParams& p) {
  detail::with_one_tensor_table(
      p, [&](const AdamWMultiTensorParams& mp) { adamw_step(mp); });
}

void adamw_step_8bit(const AdamW8bitParams& p) {
  detail::with_one_tensor_table(
      p, [&](const AdamWMultiTensorParams& mp) { adamw_step(mp); });
}

}  // namespace fourbit
