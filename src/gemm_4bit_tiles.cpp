// The portable half of the CPU matmul's AMX tile path (the kernel itself is
// src/gemm_4bit_amx.cpp): run-time ISA detection (cpu_isa, kernel_isa and the
// FOURBIT_DISABLE_* switches), Linux's AMX permission, the
// scalar model of TDPBF16PS, the portable fills of the VNNI B tile, and the bf16 products
// through the tile micro-kernel (AMX, or the scalar model for the tests).
//
// Layout contract (gemm_4bit_tiles.h): B tiles hold bf16 pairs along the reduction as
// 32-bit words, low half the even reduction row, 16 output columns per 64-byte tile row;
// the fills here write exactly the bytes of the AVX-512 fills of gemm_4bit_driver.h (the
// tests compare them), so the tile path is tested end to end on any CPU.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FOURBIT_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "dequantize_4bit_avx512.h"
#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/cpu_features.h"
#include "fourbit/error.h"
#include "gemm_4bit_driver.h"
#include "gemm_4bit_tiles.h"
#include "kernel_isa.h"

namespace fourbit {

namespace {

#ifdef FOURBIT_X86
// CPUID.(EAX=7, ECX=0):EDX bits of AMX.
constexpr unsigned kCpuidAmxBf16 = 1u << 22;
constexpr unsigned kCpuidAmxTile = 1u << 24;
// CPUID.1:ECX bit 27: the OS enabled XSAVE (and so XGETBV).
constexpr unsigned kCpuidOsxsave = 1u << 27;
// XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves tile state.
constexpr unsigned long long kXcr0Tile = (1ull << 17) | (1ull << 18);

// CPUID.1:ECX bit 29: F16C (read directly: clang's __builtin_cpu_supports has no "f16c" name
// before clang 16, and the fuzz build compiles this file with clang).
constexpr unsigned kCpuidF16c = 1u << 29;

bool f16c_in_cpuid() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & kCpuidF16c);
}

bool amx_in_cpuid() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d & kCpuidAmxBf16) && (d & kCpuidAmxTile);
}

bool os_saves_tiles() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & kCpuidOsxsave)) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const unsigned long long xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  return (xcr0 & kXcr0Tile) == kXcr0Tile;
}
#endif

}  // namespace

bool cpu_has_amx_hardware() {
#ifdef FOURBIT_X86
  static const bool has = amx_in_cpuid();
  return has;
#else
  return false;
#endif
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    // The switches are read (and validated) even where the CPU lacks the feature, so a typo
    // fails on every machine, not only on the ones that have it. FOURBIT_DISABLE_AVX512 keeps
    // its older rule (set at all: off) that src/optim_adamw.cpp shares.
    const bool avx2_off = detail::disable_switch("FOURBIT_DISABLE_AVX2");
    const bool amx_off = detail::disable_switch("FOURBIT_DISABLE_AMX");
#ifdef FOURBIT_X86
    // Every class from Avx2 up runs the AVX2 + FMA (+ F16C) kernels where it has nothing
    // better, so each needs them; FOURBIT_DISABLE_AVX2=1 leaves the portable kernels only.
    if (avx2_off || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
        !f16c_in_cpuid()) {
      return CpuIsa::Portable;
    }
    if (std::getenv("FOURBIT_DISABLE_AVX512") != nullptr || !__builtin_cpu_supports("avx512f") ||
        !__builtin_cpu_supports("avx512bw")) {
      return CpuIsa::Avx2;
    }
    if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::Avx512;
    if (!amx_off && detail::amx_kernel_compiled() && cpu_has_amx_hardware() && os_saves_tiles() &&
        detail::amx_request_permission()) {
      return CpuIsa::Amx;
    }
    return CpuIsa::Avx512Bf16;
#else
    (void)avx2_off;
    (void)amx_off;
    return CpuIsa::Portable;
#endif
  }();
  return isa;
}

const char* to_string(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Portable: return "portable";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx512Bf16: return "avx512_bf16";
    case CpuIsa::Amx: return "amx";
  }
  return "unknown";
}

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon == std::string::npos) break;
      size_t start = line.find_first_not_of(" \t", colon + 1);
      return start == std::string::npos ? "unknown" : line.substr(start);
    }
  }
  return "unknown";
}

namespace detail {

bool disable_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "0") == 0) return false;
  FOURBIT_CHECK_ARG(std::strcmp(v, "1") == 0, name, " must be 0 or 1, got '", v, "'");
  return true;
}

namespace {
// The cap of the innermost live KernelIsaCap; above every class when there is none.
std::atomic<int> kernel_isa_cap{static_cast<int>(CpuIsa::Amx)};
}  // namespace

CpuIsa kernel_isa() {
  const CpuIsa isa = cpu_isa();
  const int cap = kernel_isa_cap.load(std::memory_order_relaxed);
  return static_cast<int>(isa) <= cap ? isa : static_cast<CpuIsa>(cap);
}

KernelIsaCap::KernelIsaCap(CpuIsa cap)
    : previous_(kernel_isa_cap.exchange(static_cast<int>(cap), std::memory_order_relaxed)) {}

KernelIsaCap::~KernelIsaCap() { kernel_isa_cap.store(previous_, std::memory_order_relaxed); }

bool amx_request_permission() {
#if defined(__linux__) && defined(FOURBIT_X86)
  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux 5.16+ refuses tile data
  // (SIGILL on the first tile load) until a process asks; the grant is per process.
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}

namespace {

// bf16 bits -> fp32, denormals read as zero (TDPBF16PS's DAZ).
inline float bf16_daz(uint16_t bits) {
  if ((bits & 0x7f80u) == 0) bits &= 0x8000u;
  return bits_float(static_cast<uint32_t>(bits) << 16);
}

// fp32 with denormal results flushed to zero (FTZ).
inline float ftz(float v) {
  const uint32_t bits = float_bits(v);
  return (bits & 0x7f800000u) == 0 ? bits_float(bits & 0x80000000u) : v;
}

}  // namespace

void EmulatedTiles::dpbf16ps(uint8_t (*c)[kTileBytes], const uint8_t (*a)[kTileBytes],
                             const uint8_t (*b)[kTileBytes]) {
  for (int m = 0; m < kTileRows; ++m) {
    for (int n = 0; n < kTileBytes / 4; ++n) {
      float acc;
      std::memcpy(&acc, c[m] + 4 * n, 4);
      for (int k = 0; k < kTilePairs; ++k) {
        uint16_t a0, a1, b0, b1;
        std::memcpy(&a0, a[m] + 4 * k, 2);
        std::memcpy(&a1, a[m] + 4 * k + 2, 2);
        std::memcpy(&b0, b[k] + 4 * n, 2);
        std::memcpy(&b1, b[k] + 4 * n + 2, 2);
        acc = ftz(acc + bf16_daz(a0) * bf16_daz(b0));
        acc = ftz(acc + bf16_daz(a1) * bf16_daz(b1));
      }
      std::memcpy(c[m] + 4 * n, &acc, 4);
    }
  }
}

void micro_kernel_bf16_tiles_emulated(int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                                      const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  EmulatedTiles tiles;
  tile_micro_kernel(tiles, rows, pairs, A, lda, B, ldb, C, ldc);
}

void fill_forward_vnni_portable(const Weight4bit& w, const float* code, int64_t r0, int64_t rlen,
                                int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
  const int64_t pairs = (rlen + 1) / 2;
  Bf16Bits row[kRedTile + 1];
  for (int64_t j = 0; j < clen; ++j) {
    decode_weight_span_bf16(w, code, (c0 + j) * w.K + r0, rlen, row);
    row[rlen] = 0;  // the zero partner of an odd last reduction row
    for (int64_t q = 0; q < pairs; ++q) {
      tile[q * ld + j] = row[2 * q] | (static_cast<uint32_t>(row[2 * q + 1]) << 16);
    }
  }
  for (int64_t q = 0; q < pairs; ++q) std::fill(tile + q * ld + clen, tile + (q + 1) * ld, 0u);
}

void fill_grad_input_vnni_portable(const Weight4bit& w, const float* code, int64_t r0,
                                   int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile,
                                   int64_t ld) {
  Bf16Bits lo[kColTile], hi[kColTile];
  for (int64_t q = 0; q < (rlen + 1) / 2; ++q) {
    const int64_t n = r0 + 2 * q;
    decode_weight_span_bf16(w, code, n * w.K + c0, clen, lo);
    if (2 * q + 1 < rlen) {
      decode_weight_span_bf16(w, code, (n + 1) * w.K + c0, clen, hi);
    } else {
      std::fill(hi, hi + clen, Bf16Bits{0});
    }
    uint32_t* dst = tile + q * ld;
    for (int64_t j = 0; j < clen; ++j) dst[j] = lo[j] | (static_cast<uint32_t>(hi[j]) << 16);
    std::fill(dst + clen, dst + ld, 0u);
  }
}

namespace {

Bf16Micro tile_micro(bool emulated) {
  if (emulated) return {kAmxMicro, micro_kernel_bf16_tiles_emulated};
  FOURBIT_CHECK_RUNTIME(cpu_isa() == CpuIsa::Amx, "the AMX kernel needs a CPU with AMX (this one: ",
                        to_string(cpu_isa()), ")");
  return {kAmxMicro, micro_kernel_bf16_amx};
}

}  // namespace

void gemm_4bit_bf16_tiles(const Gemm4bitParams& p, bool emulated) {
  validate(p);
  FOURBIT_CHECK_ARG(p.dtype == DType::BFloat16, "the tile path takes bf16, got dtype ",
                    to_string(p.dtype));
  const Bf16Micro micro = tile_micro(emulated);
  if (p.M == 0 || p.weight.N == 0) return;
  const Weight4bit& w = p.weight;
  const float* code = codebook_4bit(w.quant_type).data();
  const BFloat16* bias = static_cast<const BFloat16*>(p.bias);
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
    if (emulated) {
      fill_forward_vnni_portable(w, code, r0, rlen, c0, clen, tile, ld);
    } else {
      fill_forward_bf16(w, code, r0, rlen, c0, clen, tile, ld);
    }
  };
  blocked_product_bf16(static_cast<const BFloat16*>(p.x), p.M, w.K, w.N, fill,
                       StoreTile<BFloat16>{bias, static_cast<BFloat16*>(p.y), w.N}, 0, micro);
}

void gemm_4bit_grad_input_bf16_tiles(const Gemm4bitGradInputParams& p, bool emulated) {
  validate(p);
  FOURBIT_CHECK_ARG(p.dtype == DType::BFloat16, "the tile path takes bf16, got dtype ",
                    to_string(p.dtype));
  const Bf16Micro micro = tile_micro(emulated);
  if (p.M == 0 || p.weight.K == 0) return;
  const Weight4bit& w = p.weight;
  const float* code = codebook_4bit(w.quant_type).data();
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
    if (emulated) {
      fill_grad_input_vnni_portable(w, code, r0, rlen, c0, clen, tile, ld);
    } else {
      fill_grad_input_bf16(w, code, r0, rlen, c0, clen, tile, ld);
    }
  };
  blocked_product_bf16(static_cast<const BFloat16*>(p.grad_output), p.M, w.N, w.K, fill,
                       StoreTile<BFloat16>{nullptr, static_cast<BFloat16*>(p.grad_input), w.K},
                       0, micro);
}

}  // namespace detail
}  // namespace fourbit
