// The AMX micro-kernel of the CPU 4-bit matmul: C[rows][32] += A . B over bf16 pair words,
// as 2 x 2 tiles of 16 x 16 fp32 accumulated by TDPBF16PS (the tiling, the operand layout
// and why it is fast: src/gemm_4bit_tiles.h; the B tiles are the 4-bit weight decoded to
// bf16 pairs by the drivers of src/gemm_4bit_driver.h, never the whole weight).
//
// This translation unit alone is compiled with -mamx-tile -mamx-bf16 (CMakeLists.txt, when
// the compiler takes them) and is called only when cpu_isa() is CpuIsa::Amx: the CPU has
// AMX-TILE and AMX-BF16, the OS enabled tile state in XCR0, and Linux granted this process
// XTILEDATA (arch_prctl, src/gemm_4bit_tiles.cpp). The tile configuration is loaded at the
// start of every call and released at its end, because other code on the same thread
// (oneDNN's AMX kernels) loads its own.
//
// Status: compiled in CI, never run by this project yet (no AMX machine); the same
// micro-kernel template runs in the tests on the scalar tile model (EmulatedTiles).
#include "gemm_4bit_tiles.h"

#ifdef FOURBIT_BUILD_AMX
#include <immintrin.h>

namespace fourbit {
namespace detail {

namespace {

// The tile registers. GCC's tile intrinsics are macros that paste the register number
// into the instruction text, so each (instruction, register) the micro-kernel uses is
// spelled out below with a literal.
struct AmxTiles {
  void config() {
    // Palette 1; every tile 16 rows x 64 bytes (the C, A and B tiles all have that shape).
    alignas(64) uint8_t cfg[64] = {};
    cfg[0] = 1;
    for (int t = 0; t < 8; ++t) {
      cfg[16 + 2 * t] = kTileBytes;  // colsb, little-endian 16-bit (high byte 0)
      cfg[48 + t] = kTileRows;
    }
    _tile_loadconfig(cfg);
  }
  void release() { _tile_release(); }
  template <int T>
  void zero();
  template <int T>
  void load(const void* src, int64_t stride);
  template <int T>
  void store(void* dst, int64_t stride);
  template <int C, int A, int B>
  void dp();
};

template <> inline void AmxTiles::zero<0>() { _tile_zero(0); }
template <> inline void AmxTiles::zero<1>() { _tile_zero(1); }
template <> inline void AmxTiles::zero<2>() { _tile_zero(2); }
template <> inline void AmxTiles::zero<3>() { _tile_zero(3); }
template <> inline void AmxTiles::load<0>(const void* s, int64_t st) { _tile_loadd(0, s, st); }
template <> inline void AmxTiles::load<1>(const void* s, int64_t st) { _tile_loadd(1, s, st); }
template <> inline void AmxTiles::load<2>(const void* s, int64_t st) { _tile_loadd(2, s, st); }
template <> inline void AmxTiles::load<3>(const void* s, int64_t st) { _tile_loadd(3, s, st); }
template <> inline void AmxTiles::load<4>(const void* s, int64_t st) { _tile_loadd(4, s, st); }
template <> inline void AmxTiles::load<5>(const void* s, int64_t st) { _tile_loadd(5, s, st); }
template <> inline void AmxTiles::load<6>(const void* s, int64_t st) { _tile_loadd(6, s, st); }
template <> inline void AmxTiles::load<7>(const void* s, int64_t st) { _tile_loadd(7, s, st); }
template <> inline void AmxTiles::store<0>(void* d, int64_t st) { _tile_stored(0, d, st); }
template <> inline void AmxTiles::store<1>(void* d, int64_t st) { _tile_stored(1, d, st); }
template <> inline void AmxTiles::store<2>(void* d, int64_t st) { _tile_stored(2, d, st); }
template <> inline void AmxTiles::store<3>(void* d, int64_t st) { _tile_stored(3, d, st); }
template <> inline void AmxTiles::dp<0, 4, 6>() { _tile_dpbf16ps(0, 4, 6); }
template <> inline void AmxTiles::dp<1, 4, 7>() { _tile_dpbf16ps(1, 4, 7); }
template <> inline void AmxTiles::dp<2, 5, 6>() { _tile_dpbf16ps(2, 5, 6); }
template <> inline void AmxTiles::dp<3, 5, 7>() { _tile_dpbf16ps(3, 5, 7); }

}  // namespace

bool amx_kernel_compiled() { return true; }

void micro_kernel_bf16_amx(int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                           const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  AmxTiles tiles;
  tile_micro_kernel(tiles, rows, pairs, A, lda, B, ldb, C, ldc);
}

}  // namespace detail
}  // namespace fourbit

#else  // the compiler has no AMX support: the kernel is absent and cpu_isa() never says Amx

namespace fourbit {
namespace detail {

bool amx_kernel_compiled() { return false; }
void micro_kernel_bf16_amx(int, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t,
                           float*, int64_t) {}

}  // namespace detail
}  // namespace fourbit

#endif
