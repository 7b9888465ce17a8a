// The sm90a fused kernel's shared-memory operand (include/fourbit/detail/wgmma_smem.h), on the
// CPU:
//   - smem_desc puts each field where the PTX ISA's matrix-descriptor format says;
//   - the activation stage layout is a bijection, its 16-byte chunks are the kernel's cp.async
//     chunks, stored at consecutive 16-byte offsets;
//   - an emulation of one warpgroup's wgmma.m64nNk16 over whole stages -- B read element by
//     element through the kernel's descriptors by the ISA's core-matrix rule (stated below,
//     independently of the header), A from the fragment layout decoded by frag::decode_word and
//     placed by mma::wgmma_a_reg, accumulators read back through mma::wgmma_acc -- gives
//     W X^T, i.e. the output tile Y = X deq(W)^T;
//   - the same emulation with LBO and SBO swapped, with a swizzle mode set, or with the wrong
//     k16 step advance does not.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/detail/fragment_layout.h"
#include "fourbit/detail/mma_layout.h"
#include "fourbit/detail/wgmma_smem.h"
#include "fourbit/gemm_fused.h"
#include "quantized_weight.h"

namespace {

namespace frag = fourbit::frag;
namespace mma = fourbit::mma;
namespace wg = fourbit::wgmma;
namespace detail = fourbit::detail;
using fourbit::QuantType;
using fourbit_test::QuantizedWeight;

constexpr int kLanes = 32;

TEST(WgmmaSmem, DescriptorFieldsAreWhereTheIsaPutsThem) {
  const uint64_t d = wg::smem_desc(0x2A3F0, 128, 1024, wg::Swizzle::None);
  EXPECT_EQ(d & 0x3FFF, 0x2A3F0u >> 4);          // bits 0-13: start address >> 4
  EXPECT_EQ((d >> 14) & 3, 0u);
  EXPECT_EQ((d >> 16) & 0x3FFF, 128u >> 4);      // bits 16-29: leading dimension byte offset >> 4
  EXPECT_EQ((d >> 30) & 3, 0u);
  EXPECT_EQ((d >> 32) & 0x3FFF, 1024u >> 4);     // bits 32-45: stride dimension byte offset >> 4
  EXPECT_EQ((d >> 46) & 0xFFFF, 0u);             // 46-61: base offset (49-51) and reserved, 0
  EXPECT_EQ(d >> 62, 0u);                        // bits 62-63: swizzle mode
  EXPECT_EQ(wg::smem_desc(0, 16, 16, wg::Swizzle::B128) >> 62, 1u);
  EXPECT_EQ(wg::smem_desc(0, 16, 16, wg::Swizzle::B64) >> 62, 2u);
  EXPECT_EQ(wg::smem_desc(0, 16, 16, wg::Swizzle::B32) >> 62, 3u);
  // The 14-bit address field holds the shared window's 256 KB (addresses wrap above it).
  EXPECT_EQ(wg::smem_desc(0x3FFF0, 0, 0) & 0x3FFF, 0x3FFFu);
  EXPECT_EQ(wg::x_step_desc(0x400, 3), wg::smem_desc(0x400 + 3 * 256, 128, 1024));
}

TEST(WgmmaSmem, StageLayoutIsABijectionFilledByContiguousChunks) {
  constexpr int kRows = 128;
  std::vector<int> seen(wg::x_stage_bytes(kRows) / 2, 0);
  for (int n = 0; n < kRows; ++n)
    for (int k = 0; k < 64; ++k) {
      const uint32_t off = wg::x_offset(n, k);
      ASSERT_LT(off, wg::x_stage_bytes(kRows));
      ASSERT_EQ(off % 2, 0u);
      ++seen[off / 2];
    }
  for (int v : seen) ASSERT_EQ(v, 1);
  for (int c = 0; c < kRows * 8; ++c) {
    const wg::Chunk ch = wg::x_chunk(c);
    ASSERT_EQ(wg::x_offset(ch.row, 8 * ch.kc), 16u * c) << c;
    for (int e = 0; e < 8; ++e) ASSERT_EQ(wg::x_offset(ch.row, 8 * ch.kc + e), 16u * c + 2 * e);
  }
}

// ---------------------------------------------------------------- warpgroup emulation

float bf16(float x) { return detail::bf16_to_float(detail::float_to_bf16(x)); }

// B(k, n) of a k16 x N K-major b16 operand read through descriptor `desc`, by the PTX ISA's
// shared-memory matrix layout ("Matrix Descriptor" / "Shared Memory Matrix Layout"), stated here
// on its own: the operand is tiled into core matrices of 8 rows (n) x 16 bytes (8 consecutive k).
//   no swizzle: core matrix (n / 8, k / 8) starts at start + (n / 8) SBO + (k / 8) LBO; its
//     rows are 16 bytes apart, so (n, k) is at that + (n % 8) 16 + (k % 8) 2;
//   swizzle of W = 128 / 64 / 32 bytes (modes 1 / 2 / 3): rows are W bytes long, the 8 rows of
//     a group at start + (n / 8) SBO + (n % 8) W + 2 k (LBO unused for K-major operands whose k
//     fits in one row), then the address's 16-byte chunk bits [4, 4 + log2(W / 16)) are XORed
//     with bits [7, 7 + log2(W / 16)).
float read_b(const std::vector<uint8_t>& smem, uint64_t desc, int k, int n) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const uint32_t mode = static_cast<uint32_t>(desc >> 62);
  uint32_t addr;
  if (mode == 0) {
    addr = start + (n / 8) * sbo + (k / 8) * lbo + (n % 8) * 16 + (k % 8) * 2;
  } else {
    const uint32_t width = mode == 1 ? 128 : mode == 2 ? 64 : 32;
    const uint32_t bits = mode == 1 ? 3 : mode == 2 ? 2 : 1;
    addr = start + (n / 8) * sbo + (n % 8) * width + 2 * k;
    addr ^= ((addr >> 7) & ((1u << bits) - 1)) << 4;
  }
  addr &= 0x3FFFF;  // the shared window (the emulated smem is all of it)
  uint16_t v;
  std::memcpy(&v, &smem[addr], 2);
  return detail::bf16_to_float(v);
}

enum class Fault { None, SwapLboSbo, Swizzle128, StepByOneCoreMatrix };

// One warpgroup (4 warps, fragment tiles 0..3 = W rows 0..63) times `tokens` X rows
// (wgmma's N, a multiple of 8; rows >= the real count are zero as cp.async fills them), over
// every 64-deep stage of K. Stage slots alternate between two addresses (as the kernel's ring)
// above a nonzero base, so the start-address field matters. Returns the largest
// |emulated - reference| / sum |x w| over the real rows and columns.
double warpgroup_error(const QuantizedWeight& q, int tokens, int real_tokens, Fault fault) {
  const frag::Shape s = frag::shape_of(q.N, q.K);
  std::vector<uint8_t> packed(static_cast<size_t>(fourbit::fragment_packed_bytes(q.N, q.K)));
  std::vector<float> scales(static_cast<size_t>(fourbit::fragment_scale_count(q.N, q.K, q.blocksize)));
  fourbit::repack_4bit_fragments(q.view(), packed.data(), scales.data());
  const auto& code = fourbit::codebook_4bit(q.quant_type);
  float lut[16];
  for (int i = 0; i < 16; ++i) lut[i] = code[static_cast<size_t>(i)];

  std::mt19937 rng(21);
  std::normal_distribution<float> normal;
  std::vector<float> X(static_cast<size_t>(tokens * q.K), 0.0f);
  for (int64_t i = 0; i < real_tokens * q.K; ++i) X[static_cast<size_t>(i)] = bf16(normal(rng));

  const uint32_t base = 0x400, stage = wg::x_stage_bytes(tokens);
  std::vector<uint8_t> smem(1u << 18, 0);
  EXPECT_LE(base + 2 * stage, smem.size());
  std::vector<float> acc(static_cast<size_t>(4 * kLanes * tokens / 2), 0.0f);  // [warp][lane][r]
  for (int64_t kt = 0; kt < s.k_tiles; ++kt) {
    const uint32_t tile = base + static_cast<uint32_t>(kt % 2) * stage;
    // The kernel's copy: chunk c = 8 bf16 of X row x_chunk(c).row at k chunk x_chunk(c).kc.
    for (int c = 0; c < tokens * 8; ++c) {
      const wg::Chunk ch = wg::x_chunk(c);
      for (int e = 0; e < 8; ++e) {
        const uint16_t v = detail::float_to_bf16(X[static_cast<size_t>(ch.row * q.K + kt * 64 + 8 * ch.kc + e)]);
        std::memcpy(&smem[tile + wg::x_offset(ch.row, 8 * ch.kc) + 2 * e], &v, 2);
      }
    }
    for (int st = 0; st < 4; ++st) {
      // A: 64 x 16, from each lane's fragment word st, decoded and rounded as the kernel does.
      double A[64][16] = {};
      for (int warp = 0; warp < 4; ++warp)
        for (int l = 0; l < kLanes; ++l) {
          uint32_t word = 0;
          const int64_t off = (kt * s.n_tiles + warp) * frag::kTileBytes + l * frag::kLaneBytes + 4 * st;
          if (warp < s.n_tiles) std::memcpy(&word, &packed[static_cast<size_t>(off)], 4);
          for (int qr = 0; qr < 4; ++qr) {
            const int j = qr % 2, pair = qr / 2;
            const int64_t n = 16 * warp + 8 * j + l / 4;
            const int64_t kb = (kt * 64 + 16 * st) / q.blocksize;
            const float scale = warp < s.n_tiles ? scales[static_cast<size_t>(frag::scale_index(s, kb, n))] : 0.0f;
            float v[4];
            frag::decode_word(word, j, lut, scale, v);
            const mma::Coord c = mma::wgmma_a_reg(warp, l, qr);
            A[c.row][c.col] = bf16(v[2 * pair]);
            A[c.row][c.col + 1] = bf16(v[2 * pair + 1]);
          }
        }
      uint64_t desc = wg::x_step_desc(tile, st);
      if (fault == Fault::SwapLboSbo) desc = wg::smem_desc(tile + st * wg::kStepBytes, wg::kSbo, wg::kLbo);
      if (fault == Fault::Swizzle128) desc = wg::smem_desc(tile + st * wg::kStepBytes, wg::kLbo, wg::kSbo, wg::Swizzle::B128);
      if (fault == Fault::StepByOneCoreMatrix) desc = wg::smem_desc(tile + st * wg::kLbo, wg::kLbo, wg::kSbo);
      std::vector<double> B(static_cast<size_t>(16 * tokens));
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < tokens; ++n) B[static_cast<size_t>(k * tokens + n)] = read_b(smem, desc, k, n);
      // D += A B, each accumulator register through wgmma_acc.
      for (int warp = 0; warp < 4; ++warp)
        for (int l = 0; l < kLanes; ++l)
          for (int r = 0; r < tokens / 2; ++r) {
            const mma::Coord o = mma::wgmma_acc(warp, l, r);
            double sum = 0;
            for (int k = 0; k < 16; ++k) sum += A[o.row][k] * B[static_cast<size_t>(k * tokens + o.col)];
            acc[static_cast<size_t>((warp * kLanes + l) * tokens / 2 + r)] += static_cast<float>(sum);
          }
    }
  }
  // The epilogue: Y[m][n] from accumulator (row n of W, column m of X).
  std::vector<double> Y(static_cast<size_t>(tokens * 64), 0.0);
  std::vector<int> written(static_cast<size_t>(tokens * 64), 0);
  for (int warp = 0; warp < 4; ++warp)
    for (int l = 0; l < kLanes; ++l)
      for (int r = 0; r < tokens / 2; ++r) {
        const mma::Coord o = mma::wgmma_acc(warp, l, r);
        Y[static_cast<size_t>(o.col * 64 + o.row)] = acc[static_cast<size_t>((warp * kLanes + l) * tokens / 2 + r)];
        ++written[static_cast<size_t>(o.col * 64 + o.row)];
      }
  for (int v : written) EXPECT_EQ(v, 1);
  double worst = 0;
  for (int m = 0; m < real_tokens; ++m)
    for (int64_t n = 0; n < std::min<int64_t>(q.N, 64); ++n) {
      double ref = 0, mag = 1e-30;
      for (int64_t k = 0; k < q.K; ++k) {
        const double x = X[static_cast<size_t>(m * q.K + k)], w = bf16(q.dequantized[static_cast<size_t>(n * q.K + k)]);
        ref += x * w;
        mag += std::fabs(x * w);
      }
      worst = std::max(worst, std::fabs(Y[static_cast<size_t>(m * 64 + n)] - ref) / mag);
    }
  return worst;
}

constexpr double kTolerance = 1e-5;  // fp32 accumulation order; a misplaced element costs O(1)

TEST(WgmmaSmem, WarpgroupEmulationThroughTheDescriptorEqualsXTimesDeqWTransposed) {
  struct Case {
    int64_t N, K, blocksize;
    QuantType qt;
    int tokens, real;
  };
  for (const Case& c : {Case{64, 64, 64, QuantType::NF4, 8, 8}, Case{64, 128, 32, QuantType::FP4, 32, 27},
                        Case{50, 192, 64, QuantType::NF4, 128, 128}, Case{17, 256, 256, QuantType::NF4, 16, 9}}) {
    const QuantizedWeight q(c.N, c.K, c.blocksize, c.qt, false, 5);
    EXPECT_LT(warpgroup_error(q, c.tokens, c.real, Fault::None), kTolerance)
        << "N=" << c.N << " K=" << c.K << " tokens=" << c.tokens;
  }
}

TEST(WgmmaSmem, WrongStrideSwizzleOrStepFails) {
  const QuantizedWeight q(64, 128, 64, QuantType::NF4, false, 6);
  for (Fault f : {Fault::SwapLboSbo, Fault::Swizzle128, Fault::StepByOneCoreMatrix}) {
    EXPECT_GT(warpgroup_error(q, 32, 32, f), 1e-2) << static_cast<int>(f);
  }
}

}  // namespace
