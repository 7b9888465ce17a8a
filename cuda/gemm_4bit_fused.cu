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
constexpr int kReduceThreads = 256;   // split-K reduction: one output element per thread

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
  static_assert(kWarpsM * kWarpsN * 32 == kThreads, "4 warps per CTA");
  static_assert(kABytes % 16 == 0 && kWBytes % 16 == 0, "16-byte aligned stage parts");
  static_assert(kSmemBytes <= 48 * 1024, "fits the default dynamic shared memory limit");
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

// The block scale of (row n, scale block kb) read from the stage's scale row.
template <typename T, bool kNested>
__device__ __forceinline__ float stage_scale(const FusedArgs<T>& args, const unsigned char* s_row,
                                             int n_local, int64_t n, int64_t kb,
                                             const float* nested_code, float offset) {
  if (n >= args.N) return 0.0f;
  if constexpr (!kNested) return reinterpret_cast<const float*>(s_row)[n_local];
  const int64_t block = n * args.blocks_per_row + kb;
  return detail::nested_scale(nested_code[s_row[n_local]], __ldg(args.nested_absmax + (block >> args.nested_shift)),
                              offset);
}

template <typename T, typename Tl, bool kNested>
__global__ void __launch_bounds__(kThreads)
    fused_4bit_kernel(FusedArgs<T> args, Codebook4bit code) {
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
            sc[r][t][j] = stage_scale<T, kNested>(args, s_row, n_local, n0 + n_local, kb, nested_code, offset);
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
}

// y[m][n] = sum over splits (in order) of partial[s][m][n], + bias, rounded once.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    fused_splitk_reduce_kernel(const float* partial, const T* bias, T* y, int64_t M, int64_t N, int64_t splits) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
      float acc = 0.0f;
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
  for (int64_t kb = blockIdx.y; kb < blocks_per_row; kb += gridDim.y) {
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

template <typename T, typename Tl>
void launch_fused(const FusedArgs<T>& args, const plan::FusedPlan& p, QuantType quant_type,
                  cudaStream_t stream) {
  const dim3 grid(p.grid.x, p.grid.y, p.grid_z);
  if (args.absmax_q != nullptr) {
    fused_4bit_kernel<T, Tl, true><<<grid, kThreads, Tl::kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  } else {
    fused_4bit_kernel<T, Tl, false><<<grid, kThreads, Tl::kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  }
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
  FOURBIT_CHECK_ARG(fragment_layout_supported(w), op, ": the fragment layout needs K % 64 == 0 and "
                    "K % blocksize == 0, got N=", w.N, " K=", w.K, " blocksize=", w.blocksize);
  FOURBIT_CHECK_ARG(p.dtype == DType::BFloat16 || p.dtype == DType::Float16, op,
                    ": dtype must be bfloat16 or float16, got ", to_string(p.dtype));
  FOURBIT_CHECK_ARG(cuda::compute_capability() >= 80, op, ": needs sm80 or newer, got sm",
                    cuda::compute_capability());
  FOURBIT_CHECK_ARG(p.M >= 0, op, ": M must be >= 0, got ", p.M);
  const void* scales = w.scales.nested() ? static_cast<const void*>(w.scales.absmax_q)
                                         : static_cast<const void*>(w.scales.absmax);
  FOURBIT_CHECK_ARG(w.packed && scales && (p.M == 0 || (p.x && p.y)), op, ": null pointer");
  FOURBIT_CHECK_ARG(cuda::aligned_to(p.x, 16) && cuda::aligned_to(w.packed, 16) && cuda::aligned_to(scales, 16),
                    op, ": x, the fragment bytes and the scales must be 16-byte aligned");
  FOURBIT_CHECK_ARG(!w.scales.nested() || (w.scales.nested_code && w.scales.nested_absmax && w.scales.offset),
                    op, ": nested scales need nested_code, nested_absmax and offset");
  if (p.M == 0 || w.N == 0) return;
  const plan::FusedPlan plan = plan::plan_fused(p.M, w.N, w.K, cuda::sm_count());
  FOURBIT_CHECK_ARG(plan.workspace_bytes == 0 || (fp.workspace && fp.workspace_bytes >= plan.workspace_bytes),
                    op, ": split-K needs a workspace of ", plan.workspace_bytes, " bytes, got ",
                    fp.workspace_bytes);
  const frag::Shape s = frag::shape_of(w.N, w.K);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      cuda::FusedArgs<T> args{w.packed, w.scales.absmax, w.scales.absmax_q, w.scales.nested_code,
                              w.scales.nested_absmax, w.scales.offset,
                              cuda::log2_pow2(w.blocksize),
                              w.scales.nested() ? cuda::log2_pow2(w.scales.nested_blocksize) : 0,
                              static_cast<const T*>(p.x), static_cast<const T*>(p.bias),
                              static_cast<T*>(p.y),
                              plan.splits > 1 ? static_cast<float*>(fp.workspace) : nullptr,
                              p.M, w.N, w.K, s.n_tiles, s.n_pad(), w.K / w.blocksize,
                              plan.row_tiles, plan.k_stages, plan.stages_per_split};
      if (plan.small) {
        cuda::launch_fused<T, cuda::SmallTile>(args, plan, w.quant_type, stream);
      } else {
        cuda::launch_fused<T, cuda::LargeTile>(args, plan, w.quant_type, stream);
      }
      if (plan.splits > 1) {
        const dim3 grid(cuda::capped(plan::ceil_div(w.N, cuda::kReduceThreads), plan::kMaxGridY),
                        cuda::capped(p.M, plan::kMaxGridY));
        cuda::fused_splitk_reduce_kernel<T><<<grid, cuda::kReduceThreads, 0, stream>>>(
            args.partial, args.bias, args.y, p.M, w.N, plan.splits);
        FOURBIT_CUDA_LAUNCH_CHECK();
      }
    }
  });
}

}  // namespace fourbit
