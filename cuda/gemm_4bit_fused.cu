// Fused 4-bit matmul on the fragment layout, sm80+: Y = X @ deq(W)^T (+ bias), X and Y
// fp16 or bf16, fp32 accumulation.
//
// Layout it expects: W repacked by repack_4bit_fragments(_cuda) into the fragment layout of
// include/fourbit/detail/fragment_layout.h (16 x 64 tiles of 512 bytes, lane l's 16 bytes =
// its mma.sync B fragments for four k16 steps; scales transposed to [K / blocksize][N_pad],
// fp32 or the nested uint8 form). X row-major [M, K], 16-byte aligned, K % 64 == 0.
//
// Why it is fast (by construction; nothing here is measured yet):
//   - the weight moves as 4-bit codes only: HBM -> shared memory by cp.async (16 B per lane,
//     L2 evict-first), shared -> registers by one 16-byte ld.shared per lane per tile with no
//     bank conflict and no shuffle, because the bytes are already in fragment order;
//   - a kStages-deep cp.async pipeline keeps kStages - 1 k-steps of weight, scales and
//     activations in flight while the tensor cores work on the current one;
//   - decode is in registers: a 16-entry codebook in shared memory (16 banks, no conflict),
//     one fp32 multiply by the row's block scale (nested absmax decoded here), one packed
//     cvt per pair: the bf16 weight never exists in memory;
//   - activations go through ldmatrix.x4 (A fragments), the product through
//     mma.sync.m16n8k16 with fp32 accumulators;
//   - split-K (planned by plan::plan_fused) gives small-M shapes enough CTAs to fill every
//     SM; the partial sums meet in an fp32 workspace, reduced in a fixed order (the result
//     does not depend on scheduling).
// Element math: the decode is frag::decode_word (the CPU emulation test runs it too), the
// nested scale is detail::nested_scale; weights are rounded once to bf16/fp16 as
// dequantize_4bit rounds them, so the product is X @ deq(W)^T up to fp32 summation order.
#include <type_traits>

#include "common.cuh"
#include "fourbit/detail/fragment_layout.h"
#include "fourbit/detail/launch_plan.h"
#include "fourbit/detail/mma_layout.h"
#include "fourbit/gemm_fused.h"
#include "mma_sm80.cuh"
#include "weight_4bit.cuh"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kThreads = plan::kFusedThreads;
constexpr int kStages = plan::kFusedStages;
constexpr int kTileK = static_cast<int>(plan::kFusedTileK);
static_assert(kTileK == frag::kTileK, "one fragment tile deep per stage");
// Activation rows in shared memory: 64 elements + 8 of padding = 144 bytes, so rows stay
// 16-byte aligned (cp.async and ldmatrix) and the 8 rows of one ldmatrix matrix fall in 8
// different 16-byte bank groups.
constexpr int kALd = kTileK + 8;
// Scale rows per stage: the scale blocks at k offsets 0 and 32 of the stage (blocksize 32
// puts two blocks in a 64-deep stage; larger blocksizes load the same row twice).
constexpr int kScaleRows = 2;
constexpr int kNestedCodeSize = 256;  // the nested absmax's 8-bit dynamic map
static_assert(kNestedCodeSize * sizeof(float) <= 1024, "the nested code fits 1 KB of shared memory");
// Minimum CTAs per SM for the GEMM kernels' __launch_bounds__: without it ptxas aims at 128
// registers and spills a few bytes; with it the register budget is 255 and nothing spills.
constexpr int kMinCtasPerSm = 2;
constexpr int kReduceThreads = 256;   // split-K reduction: one output element per thread
// Dynamic shared memory a CTA may ask for: above the 48 KB default the launcher opts in
// (cudaFuncAttributeMaxDynamicSharedMemorySize); 96 KB leaves two CTAs per SM on sm80.
constexpr int kMaxDynamicSmem = 96 * 1024;

template <int kWarpsM, int kWarpsN, int kMFrags>
struct Tile {
  static constexpr int kWarpsNv = kWarpsN, kMFragsv = kMFrags;
  static constexpr int kM = 16 * kMFrags * kWarpsM;
  static constexpr int kN = 2 * frag::kTileN * kWarpsN;  // each warp: two fragment tiles
  static constexpr int kABytes = kM * kALd * 2;
  static constexpr int kWBytes = (kN / frag::kTileN) * frag::kTileBytes;
  static constexpr int kSBytes = kScaleRows * kN * 4;  // fp32 scales; nested use a quarter
  static constexpr int kStageBytes = kABytes + kWBytes + kSBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kWarpsM * kWarpsN * 32 == kThreads && kWarpsNv * kMFragsv > 0, "4 warps per CTA");
  static_assert(kABytes % 16 == 0 && kWBytes % 16 == 0, "16-byte aligned stage parts");
  static_assert(kSmemBytes <= kMaxDynamicSmem, "fits the opt-in dynamic shared memory of sm80");
};
using SmallTile = Tile<1, 4, 1>;  // 16 x 128: decode-sized M
using LargeTile = Tile<2, 2, 2>;  // 64 x 64
static_assert(SmallTile::kM == plan::kFusedSmallTileM && SmallTile::kN == plan::kFusedSmallTileN,
              "launch plan and kernel agree on the small tile");
static_assert(LargeTile::kM == plan::kFusedLargeTileM && LargeTile::kN == plan::kFusedLargeTileN,
              "launch plan and kernel agree on the large tile");

template <typename T>
struct FusedArgs {
  const uint8_t* frag;         // fragment bytes
  const float* absmax;         // plain scales [K / blocksize][n_pad], or null
  const uint8_t* absmax_q;     // nested scales [K / blocksize][n_pad], or null
  const float* nested_code;    // [256]
  const float* nested_absmax;  // by original block index >> nested_shift
  const float* offset;         // one fp32
  int block_shift;             // log2(blocksize)
  int nested_shift;            // log2(nested_blocksize)
  const T* x;                  // [M, K]
  const T* bias;               // [N] or null
  T* y;                        // [M, N]
  float* partial;              // [splits][M][N] when splits > 1, else null
  int64_t M, N, K;
  int64_t n_tiles, n_pad, blocks_per_row;
  int64_t row_tiles, k_stages, stages_per_split;
};

// Issues the cp.async copies of global k-stage `st` into one shared-memory slot.
template <typename T, typename Tl, bool kNested>
__device__ __forceinline__ void load_stage(const FusedArgs<T>& args, int64_t m0, int64_t n0,
                                           int64_t st, unsigned char* slot, uint64_t policy) {
  const int64_t k0 = st * kTileK;
  T* a_s = reinterpret_cast<T*>(slot);
  unsigned char* w_s = slot + Tl::kABytes;
  unsigned char* s_s = w_s + Tl::kWBytes;
  // Static trip counts (the chunk counts are multiples of kThreads, or one guarded pass).
  constexpr int kAChunks = Tl::kM * (kTileK / 8);  // 8 elements per 16-byte chunk
  static_assert(kAChunks % kThreads == 0, "whole passes over the activation chunks");
#pragma unroll
  for (int i = 0; i < kAChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c >> 3, ch = c & 7;
    const int64_t m = m0 + r;
    const bool valid = m < args.M;
    cp_async_16(a_s + r * kALd + ch * 8, args.x + (valid ? m : 0) * args.K + k0 + ch * 8, valid);
  }
  constexpr int kWTiles = Tl::kN / frag::kTileN;
  constexpr int kWChunks = kWTiles * frag::kLanes;
  const int64_t nt0 = n0 >> 4;
  static_assert(kWChunks % kThreads == 0, "whole passes over the weight chunks");
#pragma unroll
  for (int i = 0; i < kWChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int t = c >> 5, ch = c & 31;
    const int64_t nt = nt0 + t;
    const bool valid = nt < args.n_tiles;
    const uint8_t* src = args.frag + ((st * args.n_tiles + (valid ? nt : 0)) * frag::kTileBytes + ch * 16);
    cp_async_16_hint(w_s + t * frag::kTileBytes + ch * 16, src, valid, policy);
  }
  constexpr int esize_shift = kNested ? 0 : 2;           // log2 bytes per scale
  constexpr int per_row = (Tl::kN << esize_shift) >> 4;  // 16-byte chunks per scale row
  constexpr int kSChunks = kScaleRows * per_row;
#pragma unroll
  for (int i = 0; i < (kSChunks + kThreads - 1) / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    if (kSChunks % kThreads != 0 && c >= kSChunks) break;
    const int r = c >= per_row ? 1 : 0;
    const int ch = c - r * per_row;
    const int64_t kb = (k0 + 32 * r) >> args.block_shift;
    const int64_t n = n0 + ((ch * 16) >> esize_shift);
    const bool valid = n < args.n_pad;
    const unsigned char* base = kNested ? args.absmax_q : reinterpret_cast<const unsigned char*>(args.absmax);
    const int64_t index = valid ? (kb * args.n_pad + n) : 0;
    cp_async_16(s_s + ((r * Tl::kN) << esize_shift) + ch * 16, base + (index << esize_shift), valid);
  }
}

template <typename T, typename Tl, bool kNested>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    fused_4bit_kernel(FusedArgs<T> args, Codebook4bit code) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // Device code for an arch below sm80 (the default build also targets sm75): cp.async,
  // mma.m16n8k16 and L2 policies do not exist there, and the host launches this kernel only
  // on sm80+ (check_fused). Fail loudly rather than return without writing the output.
  __trap();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float lut[kCodebook4bitSize];
  __shared__ float nested_code[kNestedCodeSize];
  if (kNested) {
    for (int i = threadIdx.x; i < kNestedCodeSize; i += kThreads) nested_code[i] = args.nested_code[i];
  }
  load_codebook(code, lut);  // ends with __syncthreads
  const float offset = kNested ? __ldg(args.offset) : 0.0f;
  const uint64_t policy = l2_evict_first_policy();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / Tl::kWarpsNv, wn = warp % Tl::kWarpsNv;  // compile-time divisors
  constexpr int kMF = Tl::kMFragsv;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Tl::kN;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.z) * args.stages_per_split;
  const int64_t s_end = min(s_begin + args.stages_per_split, args.k_stages);
  const int64_t steps = s_end - s_begin;
  const mma::Coord la = mma::a_ldsm(lane);

  for (int64_t rt = blockIdx.y; rt < args.row_tiles; rt += gridDim.y) {
    const int64_t m0 = rt * Tl::kM;
    float acc[kMF][4][4];
#pragma unroll
    for (int f = 0; f < kMF; ++f)
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[f][nb][r] = 0.0f;

    // Prologue: kStages - 1 stages in flight (an empty group when the split is shorter).
#pragma unroll 1
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < steps) load_stage<T, Tl, kNested>(args, m0, n0, s_begin + s, smem + s * Tl::kStageBytes, policy);
      cp_async_commit();
    }
    int read_slot = 0, write_slot = kStages - 1;
    for (int64_t it = 0; it < steps; ++it) {
      cp_async_wait<kStages - 2>();  // stage `it` has landed (for this thread)
      __syncthreads();               // ... for every thread; slot `write_slot` is free
      if (it + kStages - 1 < steps) {
        load_stage<T, Tl, kNested>(args, m0, n0, s_begin + it + kStages - 1, smem + write_slot * Tl::kStageBytes, policy);
      }
      cp_async_commit();

      const unsigned char* slot = smem + read_slot * Tl::kStageBytes;
      const T* a_s = reinterpret_cast<const T*>(slot);
      const unsigned char* w_s = slot + Tl::kABytes;
      const unsigned char* s_s = w_s + Tl::kWBytes;
      const int64_t k0 = (s_begin + it) * kTileK;
      constexpr int esize_shift = kNested ? 0 : 2;

      // This lane's scales: [scale row][fragment tile][n8 half].
      float sc[kScaleRows][2][2];
#pragma unroll
      for (int r = 0; r < kScaleRows; ++r) {
        const int64_t kb = (k0 + 32 * r) >> args.block_shift;
        const unsigned char* s_row = s_s + ((r * Tl::kN) << esize_shift);
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int n_local = wn * 32 + t * 16 + 8 * j + (lane >> 2);
            sc[r][t][j] = fragment_stage_scale<kNested>(args, s_row, n_local, n0 + n_local, kb, nested_code, offset);
          }
      }
      // This lane's codes: one 16-byte load per fragment tile (four k16 steps).
      uint4 wv[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        wv[t] = *reinterpret_cast<const uint4*>(w_s + (wn * 2 + t) * frag::kTileBytes + lane * frag::kLaneBytes);
      }
#pragma unroll
      for (int s = 0; s < frag::kWordsPerLane; ++s) {
        uint32_t a[kMF][4];
#pragma unroll
        for (int f = 0; f < kMF; ++f) {
          ldsm_x4(a[f], a_s + (wm * 16 * kMF + f * 16 + la.row) * kALd + s * 16 + la.col);
        }
        uint32_t b[4][2];
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const uint32_t word = s == 0 ? wv[t].x : s == 1 ? wv[t].y : s == 2 ? wv[t].z : wv[t].w;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float v[4];
            frag::decode_word(word, j, lut, sc[s >> 1][t][j], v);
            b[2 * t + j][0] = pack2<T>(v[0], v[1]);
            b[2 * t + j][1] = pack2<T>(v[2], v[3]);
          }
        }
#pragma unroll
        for (int f = 0; f < kMF; ++f)
#pragma unroll
          for (int nb = 0; nb < 4; ++nb) mma_16816<T>(acc[f][nb], a[f], b[nb]);
      }
      read_slot = read_slot == kStages - 1 ? 0 : read_slot + 1;
      write_slot = write_slot == kStages - 1 ? 0 : write_slot + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // every slot is free before the next row tile's prologue

    // Epilogue: accumulator registers to (row, column) by mma::acc.
#pragma unroll
    for (int f = 0; f < kMF; ++f)
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const mma::Coord o = mma::acc(lane, r);
          const int64_t m = m0 + wm * 16 * kMF + f * 16 + o.row;
          const int64_t n = n0 + wn * 32 + nb * 8 + o.col;
          if (m < args.M && n < args.N) {
            if (args.partial != nullptr) {
              args.partial[(blockIdx.z * args.M + m) * args.N + n] = acc[f][nb][r];
            } else {
              const float bias = args.bias != nullptr ? to_float(args.bias[n]) : 0.0f;
              args.y[m * args.N + n] = from_float<T>(acc[f][nb][r] + bias);
            }
          }
        }
  }
#endif
}

// ---------------------------------------------------------------- input gradient
//
// dX[M, K] = dY[M, N] @ deq(W) on the same fragments. A warp owns one 64-deep fragment column
// kt (64 output columns k) and 16 kMF rows; a stage reduces over 64 rows n of W: the dY slice
// [rows][n0, n0 + 64) by cp.async + ldmatrix, and the warp's four fragment tiles (kt, nt..nt+3).
// Decoded exactly as in the forward, each 8 x 8 (n x k) register is transposed by movmatrix
// into the B fragment of B(n, k) = W[n][k]: output k8 block q = 2 word + r takes
// b0 = trans(reg(j = 0, r)), b1 = trans(reg(j = 1, r)) (emulated in test_fragment_layout.cpp).

template <int kWarpsM, int kWarpsN, int kMFrags>
struct GradTile {
  static constexpr int kWarpsNv = kWarpsN, kMFragsv = kMFrags;
  static constexpr int kM = 16 * kMFrags * kWarpsM;
  static constexpr int kN = frag::kTileK * kWarpsN;             // output columns (k)
  static constexpr int kNTilesPerStage = kTileK / frag::kTileN;  // 4 fragment tiles deep in n
  static constexpr int kABytes = kM * kALd * 2;
  static constexpr int kWBytes = kWarpsN * kNTilesPerStage * frag::kTileBytes;
  static constexpr int kSBytes = kScaleRows * kWarpsN * kTileK * 4;  // [warp col][row][64 n] fp32
  static constexpr int kStageBytes = kABytes + kWBytes + kSBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kWarpsM * kWarpsN * 32 == kThreads && kWarpsNv * kMFragsv > 0, "4 warps per CTA");
  static_assert(kSmemBytes <= kMaxDynamicSmem, "fits the opt-in dynamic shared memory of sm80");
};
using GradSmallTile = GradTile<1, 4, 1>;  // 16 x 256
using GradLargeTile = GradTile<2, 2, 2>;  // 64 x 128
static_assert(GradSmallTile::kN == plan::kFusedGradSmallTileN && GradLargeTile::kN == plan::kFusedGradLargeTileN,
              "launch plan and kernel agree on the gradient tiles");

// Stage st: dY[m0.., 64 st ..] and, per warp column w, tiles (kt0 + w, 4 st + i) and their
// scales (rows kb of k offsets 0 and 32 of that fragment column, 64 n each).
template <typename T, typename Tl, bool kNested>
__device__ __forceinline__ void load_stage_grad(const FusedArgs<T>& args, int64_t m0, int64_t kt0,
                                                int64_t st, unsigned char* slot, uint64_t policy) {
  const int64_t nbase = st * kTileK;
  T* a_s = reinterpret_cast<T*>(slot);
  unsigned char* w_s = slot + Tl::kABytes;
  unsigned char* s_s = w_s + Tl::kWBytes;
  constexpr int kAChunks = Tl::kM * (kTileK / 8);
  static_assert(kAChunks % kThreads == 0, "whole passes over the dY chunks");
#pragma unroll
  for (int i = 0; i < kAChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c >> 3, ch = c & 7;
    const int64_t m = m0 + r, n = nbase + ch * 8;
    const bool valid = m < args.M && n < args.N;  // N % 8 == 0: a chunk is all in or all out
    cp_async_16(a_s + r * kALd + ch * 8, args.x + (valid ? m * args.N + n : 0), valid);
  }
  constexpr int kWChunks = Tl::kWarpsNv * Tl::kNTilesPerStage * frag::kLanes;
  static_assert(kWChunks % kThreads == 0, "whole passes over the weight chunks");
#pragma unroll
  for (int i = 0; i < kWChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int t = c >> 5, ch = c & 31;
    const int w = t >> 2, tn = t & 3;  // warp column, tile in n
    const int64_t kt = kt0 + w, nt = st * Tl::kNTilesPerStage + tn;
    const bool valid = nt < args.n_tiles && (kt << 6) < args.K;
    const uint8_t* src = args.frag + ((valid ? kt * args.n_tiles + nt : 0) * frag::kTileBytes + ch * 16);
    cp_async_16_hint(w_s + t * frag::kTileBytes + ch * 16, src, valid, policy);
  }
  constexpr int esize_shift = kNested ? 0 : 2;
  constexpr int per_row = (kTileK << esize_shift) >> 4;  // 16-byte chunks per 64-entry row
  constexpr int kSChunks = Tl::kWarpsNv * kScaleRows * per_row;
#pragma unroll
  for (int i = 0; i < (kSChunks + kThreads - 1) / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    if (kSChunks % kThreads != 0 && c >= kSChunks) break;
    const int row = c / per_row, ch = c % per_row;  // compile-time divisor
    const int w = row >> 1, r = row & 1;
    const int64_t kt = kt0 + w;
    const int64_t kb = ((kt << 6) + 32 * r) >> args.block_shift;
    const int64_t n = nbase + ((ch * 16) >> esize_shift);
    const bool valid = n < args.n_pad && (kt << 6) < args.K;
    const unsigned char* base = kNested ? args.absmax_q : reinterpret_cast<const unsigned char*>(args.absmax);
    const int64_t index = valid ? (kb * args.n_pad + n) : 0;
    cp_async_16(s_s + ((row * kTileK) << esize_shift) + ch * 16, base + (index << esize_shift), valid);
  }
}

template <typename T, typename Tl, bool kNested>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    fused_4bit_grad_input_kernel(FusedArgs<T> args, Codebook4bit code) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // Device code for an arch below sm80 (the default build also targets sm75): cp.async,
  // mma.m16n8k16 and L2 policies do not exist there, and the host launches this kernel only
  // on sm80+ (check_fused). Fail loudly rather than return without writing the output.
  __trap();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float lut[kCodebook4bitSize];
  __shared__ float nested_code[kNestedCodeSize];
  if (kNested) {
    for (int i = threadIdx.x; i < kNestedCodeSize; i += kThreads) nested_code[i] = args.nested_code[i];
  }
  load_codebook(code, lut);
  const float offset = kNested ? __ldg(args.offset) : 0.0f;
  const uint64_t policy = l2_evict_first_policy();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / Tl::kWarpsNv, wn = warp % Tl::kWarpsNv;
  constexpr int kMF = Tl::kMFragsv;
  const int64_t kt0 = static_cast<int64_t>(blockIdx.x) * Tl::kWarpsNv;  // first fragment column
  const int64_t kt = kt0 + wn;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.z) * args.stages_per_split;
  const int64_t s_end = min(s_begin + args.stages_per_split, args.k_stages);
  const int64_t steps = s_end - s_begin;
  const mma::Coord la = mma::a_ldsm(lane);
  constexpr int esize_shift = kNested ? 0 : 2;

  for (int64_t rt = blockIdx.y; rt < args.row_tiles; rt += gridDim.y) {
    const int64_t m0 = rt * Tl::kM;
    float acc[kMF][8][4];
#pragma unroll
    for (int f = 0; f < kMF; ++f)
#pragma unroll
      for (int q = 0; q < 8; ++q)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[f][q][r] = 0.0f;

#pragma unroll 1
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < steps) load_stage_grad<T, Tl, kNested>(args, m0, kt0, s_begin + s, smem + s * Tl::kStageBytes, policy);
      cp_async_commit();
    }
    int read_slot = 0, write_slot = kStages - 1;
    for (int64_t it = 0; it < steps; ++it) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      if (it + kStages - 1 < steps) {
        load_stage_grad<T, Tl, kNested>(args, m0, kt0, s_begin + it + kStages - 1,
                                        smem + write_slot * Tl::kStageBytes, policy);
      }
      cp_async_commit();

      const unsigned char* slot = smem + read_slot * Tl::kStageBytes;
      const T* a_s = reinterpret_cast<const T*>(slot);
      const unsigned char* w_s = slot + Tl::kABytes;
      const unsigned char* s_s = w_s + Tl::kWBytes;
      const int64_t nbase = (s_begin + it) * kTileK;
#pragma unroll
      for (int tn = 0; tn < Tl::kNTilesPerStage; ++tn) {
        // Scales of this lane's two rows n (j = 0, 1) for the two scale rows r.
        float sc[kScaleRows][2];
#pragma unroll
        for (int r = 0; r < kScaleRows; ++r) {
          const int64_t kb = ((kt << 6) + 32 * r) >> args.block_shift;
          const unsigned char* s_row = s_s + (((wn * kScaleRows + r) * kTileK) << esize_shift);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int n_local = tn * 16 + 8 * j + (lane >> 2);
            sc[r][j] = fragment_stage_scale<kNested>(args, s_row, n_local, nbase + n_local, kb, nested_code, offset);
          }
        }
        uint32_t a[kMF][4];
#pragma unroll
        for (int f = 0; f < kMF; ++f) {
          ldsm_x4(a[f], a_s + (wm * 16 * kMF + f * 16 + la.row) * kALd + tn * 16 + la.col);
        }
        const uint4 wv = *reinterpret_cast<const uint4*>(
            w_s + (wn * Tl::kNTilesPerStage + tn) * frag::kTileBytes + lane * frag::kLaneBytes);
#pragma unroll
        for (int word = 0; word < frag::kWordsPerLane; ++word) {
          const uint32_t bits = word == 0 ? wv.x : word == 1 ? wv.y : word == 2 ? wv.z : wv.w;
          uint32_t reg[2][2];  // [j][r]: 8 x 8 (n x k) blocks in the forward's B order
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float v[4];
            frag::decode_word(bits, j, lut, sc[word >> 1][j], v);
            reg[j][0] = pack2<T>(v[0], v[1]);
            reg[j][1] = pack2<T>(v[2], v[3]);
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint32_t b[2] = {movmatrix_trans(reg[0][r]), movmatrix_trans(reg[1][r])};
#pragma unroll
            for (int f = 0; f < kMF; ++f) mma_16816<T>(acc[f][2 * word + r], a[f], b);
          }
        }
      }
      read_slot = read_slot == kStages - 1 ? 0 : read_slot + 1;
      write_slot = write_slot == kStages - 1 ? 0 : write_slot + 1;
    }
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll
    for (int f = 0; f < kMF; ++f)
#pragma unroll
      for (int q = 0; q < 8; ++q)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const mma::Coord o = mma::acc(lane, r);
          const int64_t m = m0 + wm * 16 * kMF + f * 16 + o.row;
          const int64_t k = (kt << 6) + q * 8 + o.col;
          if (m < args.M && k < args.K) {
            if (args.partial != nullptr) {
              args.partial[(blockIdx.z * args.M + m) * args.K + k] = acc[f][q][r];
            } else {
              args.y[m * args.K + k] = from_float<T>(acc[f][q][r]);
            }
          }
        }
  }
#endif
}

// y[m][n] = sum over splits (in order) of partial[s][m][n], + bias, rounded once.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    fused_splitk_reduce_kernel(const float* partial, const T* bias, T* y, int64_t M, int64_t N, int64_t splits) {
  // unroll 1: a grid-stride loop the compiler unrolls gets a 64-bit division for its trip count.
#pragma unroll 1
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
#pragma unroll 1
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
      float acc = 0.0f;
#pragma unroll 1
      for (int64_t s = 0; s < splits; ++s) acc += partial[(s * M + m) * N + n];
      const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
      y[m * N + n] = from_float<T>(acc + b);
    }
  }
}

// One CTA per fragment tile (blockIdx.x: nt, blockIdx.y: kt, grid-stride): byte by byte,
// the two elements frag::element_in_tile names, read from bitsandbytes' packing.
__global__ void __launch_bounds__(kThreads)
    repack_fragments_kernel(const uint8_t* packed, uint8_t* out, int64_t N, int64_t K,
                            int64_t n_tiles, int64_t k_tiles) {
  for (int64_t kt = blockIdx.y; kt < k_tiles; kt += gridDim.y) {
    for (int64_t nt = blockIdx.x; nt < n_tiles; nt += gridDim.x) {
      for (int within = threadIdx.x; within < frag::kTileBytes; within += kThreads) {
        const int lane = within >> 4, word = (within >> 2) & 3;
        uint32_t byte = 0;
#pragma unroll
        for (int high = 0; high < 2; ++high) {
          const frag::Element e = frag::element_in_tile(lane, word, 2 * (within & 3) + high);
          const int64_t n = nt * frag::kTileN + e.n, k = kt * frag::kTileK + e.k;
          if (n < N) {
            const int64_t g = n * K + k;
            byte |= static_cast<uint32_t>(detail::nibble_of(packed[g >> 1], g)) << (4 * high);
          }
        }
        out[(kt * n_tiles + nt) * frag::kTileBytes + within] = static_cast<uint8_t>(byte);
      }
    }
  }
}

// Scales transposed: out[kb * n_pad + n] = in[n * blocks_per_row + kb], 0 for padded rows.
template <typename S>
__global__ void __launch_bounds__(kReduceThreads)
    repack_scales_kernel(const S* in, S* out, int64_t N, int64_t n_pad, int64_t blocks_per_row) {
#pragma unroll 1
  for (int64_t kb = blockIdx.y; kb < blocks_per_row; kb += gridDim.y) {
#pragma unroll 1
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; n < n_pad;
         n += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
      out[kb * n_pad + n] = n < N ? in[n * blocks_per_row + kb] : S(0);
    }
  }
}

uint32_t capped(int64_t v, int64_t cap) { return static_cast<uint32_t>(std::max<int64_t>(std::min(v, cap), 1)); }

int sm_count() {
  int device = 0, count = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&device));
  FOURBIT_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Opts a kernel in to `bytes` of dynamic shared memory when that is above the default.
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    FOURBIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename T, typename Tl>
void launch_fused(const FusedArgs<T>& args, const plan::FusedPlan& p, QuantType quant_type,
                  cudaStream_t stream) {
  const dim3 grid(p.grid.x, p.grid.y, p.grid_z);
  if (args.absmax_q != nullptr) {
    allow_smem(fused_4bit_kernel<T, Tl, true>, Tl::kSmemBytes);
    fused_4bit_kernel<T, Tl, true><<<grid, kThreads, Tl::kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  } else {
    allow_smem(fused_4bit_kernel<T, Tl, false>, Tl::kSmemBytes);
    fused_4bit_kernel<T, Tl, false><<<grid, kThreads, Tl::kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  }
  FOURBIT_CUDA_LAUNCH_CHECK();
}

template <typename T, typename Tl>
void launch_fused_grad(const FusedArgs<T>& args, const plan::FusedPlan& p, QuantType quant_type,
                       cudaStream_t stream) {
  const dim3 grid(p.grid.x, p.grid.y, p.grid_z);
  if (args.absmax_q != nullptr) {
    allow_smem(fused_4bit_grad_input_kernel<T, Tl, true>, Tl::kSmemBytes);
    fused_4bit_grad_input_kernel<T, Tl, true><<<grid, kThreads, Tl::kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  } else {
    allow_smem(fused_4bit_grad_input_kernel<T, Tl, false>, Tl::kSmemBytes);
    fused_4bit_grad_input_kernel<T, Tl, false><<<grid, kThreads, Tl::kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  }
  FOURBIT_CUDA_LAUNCH_CHECK();
}

// Checks shared by both directions; returns the scales pointer.
void check_fused(const Weight4bit& w, DType dtype, int64_t M, const void* in, const void* out, const char* op) {
  FOURBIT_CHECK_ARG(fragment_layout_supported(w), op, ": the fragment layout needs K % 64 == 0 and "
                    "K % blocksize == 0, got N=", w.N, " K=", w.K, " blocksize=", w.blocksize);
  FOURBIT_CHECK_ARG(dtype == DType::BFloat16 || dtype == DType::Float16, op,
                    ": dtype must be bfloat16 or float16, got ", to_string(dtype));
  FOURBIT_CHECK_ARG(compute_capability() >= 80, op, ": needs sm80 or newer, got sm", compute_capability());
  FOURBIT_CHECK_ARG(M >= 0, op, ": M must be >= 0, got ", M);
  const void* scales = w.scales.nested() ? static_cast<const void*>(w.scales.absmax_q)
                                         : static_cast<const void*>(w.scales.absmax);
  FOURBIT_CHECK_ARG(w.packed && scales && (M == 0 || (in && out)), op, ": null pointer");
  FOURBIT_CHECK_ARG(aligned_to(in, 16) && aligned_to(w.packed, 16) && aligned_to(scales, 16), op,
                    ": the activations, the fragment bytes and the scales must be 16-byte aligned");
  FOURBIT_CHECK_ARG(!w.scales.nested() || (w.scales.nested_code && w.scales.nested_absmax && w.scales.offset),
                    op, ": nested scales need nested_code, nested_absmax and offset");
}

template <typename T>
FusedArgs<T> fused_args(const Weight4bit& w, const plan::FusedPlan& plan, const void* x, const void* bias,
                        void* y, float* partial, int64_t M) {
  const frag::Shape s = frag::shape_of(w.N, w.K);
  return FusedArgs<T>{w.packed, w.scales.absmax, w.scales.absmax_q, w.scales.nested_code,
                      w.scales.nested_absmax, w.scales.offset, log2_pow2(w.blocksize),
                      w.scales.nested() ? log2_pow2(w.scales.nested_blocksize) : 0,
                      static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y),
                      plan.splits > 1 ? partial : nullptr, M, w.N, w.K, s.n_tiles, s.n_pad(),
                      w.K / w.blocksize, plan.row_tiles, plan.k_stages, plan.stages_per_split};
}

template <typename T>
void reduce_splits(const FusedArgs<T>& args, int64_t cols, int64_t splits, cudaStream_t stream) {
  const dim3 grid(capped(plan::ceil_div(cols, kReduceThreads), plan::kMaxGridY), capped(args.M, plan::kMaxGridY));
  fused_splitk_reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(args.partial, args.bias, args.y, args.M,
                                                                     cols, splits);
  FOURBIT_CUDA_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

int64_t gemm_4bit_fused_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  return plan::plan_fused(M, N, K, cuda::sm_count()).workspace_bytes;
}

void repack_4bit_fragments_cuda(const Weight4bit& w, uint8_t* frag_packed, void* frag_scales,
                                cudaStream_t stream) {
  FOURBIT_CHECK_ARG(fragment_layout_supported(w), "repack_4bit_fragments_cuda: the fragment layout "
                    "needs K % 64 == 0 and K % blocksize == 0, got N=", w.N, " K=", w.K,
                    " blocksize=", w.blocksize);
  const frag::Shape s = frag::shape_of(w.N, w.K);
  const dim3 grid(cuda::capped(s.n_tiles, plan::kMaxGridY), cuda::capped(s.k_tiles, plan::kMaxGridY));
  cuda::repack_fragments_kernel<<<grid, cuda::kThreads, 0, stream>>>(w.packed, frag_packed, w.N, w.K,
                                                                     s.n_tiles, s.k_tiles);
  FOURBIT_CUDA_LAUNCH_CHECK();
  const int64_t blocks_per_row = w.K / w.blocksize;
  const dim3 sgrid(cuda::capped(plan::ceil_div(s.n_pad(), cuda::kReduceThreads), plan::kMaxGridY),
                   cuda::capped(blocks_per_row, plan::kMaxGridY));
  if (w.scales.nested()) {
    cuda::repack_scales_kernel<uint8_t><<<sgrid, cuda::kReduceThreads, 0, stream>>>(
        w.scales.absmax_q, static_cast<uint8_t*>(frag_scales), w.N, s.n_pad(), blocks_per_row);
  } else {
    cuda::repack_scales_kernel<float><<<sgrid, cuda::kReduceThreads, 0, stream>>>(
        w.scales.absmax, static_cast<float*>(frag_scales), w.N, s.n_pad(), blocks_per_row);
  }
  FOURBIT_CUDA_LAUNCH_CHECK();
}

void gemm_4bit_fused_cuda(const Gemm4bitFusedParams& fp, cudaStream_t stream) {
  const Gemm4bitParams& p = fp.gemm;
  const Weight4bit& w = p.weight;
  const char* op = "gemm_4bit_fused_cuda";
  cuda::check_fused(w, p.dtype, p.M, p.x, p.y, op);
  if (p.M == 0 || w.N == 0) return;
  const plan::FusedPlan plan = plan::plan_fused(p.M, w.N, w.K, cuda::sm_count());
  FOURBIT_CHECK_ARG(plan.workspace_bytes == 0 || (fp.workspace && fp.workspace_bytes >= plan.workspace_bytes),
                    op, ": split-K needs a workspace of ", plan.workspace_bytes, " bytes, got ",
                    fp.workspace_bytes);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      const auto args = cuda::fused_args<T>(w, plan, p.x, p.bias, p.y, static_cast<float*>(fp.workspace), p.M);
      if (plan.small) {
        cuda::launch_fused<T, cuda::SmallTile>(args, plan, w.quant_type, stream);
      } else {
        cuda::launch_fused<T, cuda::LargeTile>(args, plan, w.quant_type, stream);
      }
      if (plan.splits > 1) cuda::reduce_splits<T>(args, w.N, plan.splits, stream);
    }
  });
}

int64_t gemm_4bit_fused_grad_input_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  return plan::plan_fused_grad_input(M, N, K, cuda::sm_count()).workspace_bytes;
}

void gemm_4bit_fused_grad_input_cuda(const Gemm4bitFusedGradInputParams& fp, cudaStream_t stream) {
  const Gemm4bitGradInputParams& p = fp.gemm;
  const Weight4bit& w = p.weight;
  const char* op = "gemm_4bit_fused_grad_input_cuda";
  cuda::check_fused(w, p.dtype, p.M, p.grad_output, p.grad_input, op);
  FOURBIT_CHECK_ARG(w.N % 8 == 0, op, ": N must be a multiple of 8 (16-byte rows of dY), got ", w.N);
  if (p.M == 0) return;
  const plan::FusedPlan plan = plan::plan_fused_grad_input(p.M, w.N, w.K, cuda::sm_count());
  FOURBIT_CHECK_ARG(plan.workspace_bytes == 0 || (fp.workspace && fp.workspace_bytes >= plan.workspace_bytes),
                    op, ": split-K needs a workspace of ", plan.workspace_bytes, " bytes, got ",
                    fp.workspace_bytes);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      const auto args = cuda::fused_args<T>(w, plan, p.grad_output, nullptr, p.grad_input,
                                            static_cast<float*>(fp.workspace), p.M);
      if (plan.small) {
        cuda::launch_fused_grad<T, cuda::GradSmallTile>(args, plan, w.quant_type, stream);
      } else {
        cuda::launch_fused_grad<T, cuda::GradLargeTile>(args, plan, w.quant_type, stream);
      }
      if (plan.splits > 1) cuda::reduce_splits<T>(args, w.K, plan.splits, stream);
    }
  });
}

}  // namespace fourbit
