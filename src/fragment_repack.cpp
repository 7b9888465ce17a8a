// Host repack between bitsandbytes' packed 4-bit layout and the fused kernel's fragment
// layout. The permutation itself is include/fourbit/detail/fragment_layout.h (shared with the
// CUDA repack kernel); this file only walks it.
#include <cstring>

#include "fourbit/detail/fragment_layout.h"
#include "fourbit/error.h"
#include "fourbit/gemm_fused.h"

namespace fourbit {

bool fragment_layout_supported(const Weight4bit& w) {
  return w.K > 0 && w.N > 0 && w.K % frag::kTileK == 0 && w.blocksize > 0 && w.K % w.blocksize == 0;
}

int64_t fragment_packed_bytes(int64_t N, int64_t K) { return frag::shape_of(N, K).bytes(); }

int64_t fragment_scale_count(int64_t N, int64_t K, int64_t blocksize) {
  return (K / blocksize) * frag::shape_of(N, K).n_pad();
}

namespace {
void check(const Weight4bit& w, const char* what) {
  FOURBIT_CHECK_ARG(fragment_layout_supported(w), what, ": the fragment layout needs K % 64 == 0 "
                    "and K % blocksize == 0, got N=", w.N, " K=", w.K, " blocksize=", w.blocksize);
}
}  // namespace

void repack_4bit_fragments(const Weight4bit& w, uint8_t* frag_packed, void* frag_scales) {
  check(w, "repack_4bit_fragments");
  const frag::Shape s = frag::shape_of(w.N, w.K);
  for (int64_t byte = 0; byte < s.bytes(); ++byte) {
    uint32_t out = 0;
    for (int high = 0; high < 2; ++high) {
      const frag::Element e = frag::element_of_byte(s, byte, high);
      if (e.n >= w.N) continue;  // padded rows: zero nibbles
      const int64_t g = e.n * w.K + e.k;
      out |= static_cast<uint32_t>(detail::nibble_of(w.packed[g >> 1], g)) << (4 * high);
    }
    frag_packed[byte] = static_cast<uint8_t>(out);
  }
  const int64_t blocks_per_row = w.K / w.blocksize;
  for (int64_t kb = 0; kb < blocks_per_row; ++kb) {
    for (int64_t n = 0; n < s.n_pad(); ++n) {
      const int64_t dst = frag::scale_index(s, kb, n), src = n * blocks_per_row + kb;
      if (w.scales.nested()) {
        static_cast<uint8_t*>(frag_scales)[dst] = n < w.N ? w.scales.absmax_q[src] : 0;
      } else {
        static_cast<float*>(frag_scales)[dst] = n < w.N ? w.scales.absmax[src] : 0.0f;
      }
    }
  }
}

void unpack_4bit_fragments(const Weight4bit& w, const uint8_t* frag_packed, const void* frag_scales,
                           uint8_t* packed, void* scales) {
  check(w, "unpack_4bit_fragments");
  const frag::Shape s = frag::shape_of(w.N, w.K);
  const int64_t numel = w.N * w.K;
  std::memset(packed, 0, static_cast<size_t>((numel + 1) / 2));
  for (int64_t n = 0; n < w.N; ++n) {
    for (int64_t k = 0; k < w.K; ++k) {
      const frag::Position p = frag::position_of(s, n, k);
      const uint32_t code = (frag_packed[p.byte] >> p.shift) & 15u;
      const int64_t g = n * w.K + k;
      packed[g >> 1] = static_cast<uint8_t>(packed[g >> 1] | (g & 1 ? code : code << 4));
    }
  }
  const int64_t blocks_per_row = w.K / w.blocksize;
  for (int64_t n = 0; n < w.N; ++n) {
    for (int64_t kb = 0; kb < blocks_per_row; ++kb) {
      const int64_t src = frag::scale_index(s, kb, n), dst = n * blocks_per_row + kb;
      if (w.scales.nested()) {
        static_cast<uint8_t*>(scales)[dst] = static_cast<const uint8_t*>(frag_scales)[src];
      } else {
        static_cast<float*>(scales)[dst] = static_cast<const float*>(frag_scales)[src];
      }
    }
  }
}

}  // namespace fourbit
