// CUDA tiled 4-bit matmuls: the forward Y = X @ deq(W)^T + bias and the input gradient
// dX = dY @ deq(W), for M beyond the gemv kernel. The CPU twin is the blocked path of
// src/gemm_4bit.cpp.
//
// Both are C[M, cols] = A[M, R] @ B with B a view of the weight (forward: B[k][n] = W[n][k],
// R = K; input gradient: B[n][k] = W[n][k], R = N). A CTA owns a kTileM x kTileN output
// tile; each main-loop step stages a kTileM x kTileK slice of A and the matching slice of
// W in shared memory and multiplies them. The weight slice is decoded from the packed
// bytes on its way into shared memory (8 codes per 32-bit load, nested absmax decoded in
// registers), so the dequantized weight never exists in device memory: the kernel reads
// N * K / 2 bytes of weight per row tile of A instead of 2 * N * K.
//
// The shared-memory weight slice is always stored as rows of W ([n][k]); the forward
// reads it as a column-major B and the input gradient as a row-major B, so one loader
// serves both. Math: tensor-core fragments with fp32 accumulators for
// fp16/bf16 on sm80+ (mma.sync m16n8k16 fed by ldmatrix; each of the 4 warps owns a 32 x 32
// quarter of the tile), or an fp32 CUDA-core tile (8 x 4 outputs per thread) for fp32 and
// older GPUs.
#include <type_traits>

#include "common.cuh"
#include "fourbit/detail/mma_layout.h"
#include "fourbit/detail/launch_plan.h"
#include "gemm_4bit_kernels.cuh"
#include "mma_sm80.cuh"
#include "weight_4bit.cuh"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kTileM = plan::kTileM;  // activation rows per CTA tile
constexpr int kTileN = plan::kTileN;  // output columns per CTA tile
constexpr int kTileK = 32;     // reduction depth per main-loop step
constexpr int kThreads = 128;  // 4 warps: 2 x 2 warp quarters of 32 x 32 outputs
// Shared-memory row padding in elements: rows stay 16-byte aligned (ldmatrix's row
// addresses) while consecutive rows shift banks (80- and 144-byte strides: the 8 rows of an
// 8x8 matrix hit 8 distinct 16-byte bank groups).
constexpr int kPad = 8;
constexpr int kCPad = 4;  // fp32 epilogue tile padding

template <typename T>
struct TiledArgs {
  Weight4bit w;
  const T* a;     // [M, R]
  const T* bias;  // [cols] or null
  T* c;           // [M, cols]
  int64_t M, R, cols;
  int64_t row_tiles;  // ceil(M / kTileM), from the host's plan_tiled
  bool vec_weight;  // K % 8 == 0 and packed 4-byte aligned: 8 codes per 32-bit load
  bool vec_act;     // R % 8 == 0 and a 16-byte aligned: 8 activations per vector load
};

template <typename S>
__device__ __forceinline__ S to_smem(float v) {
  return from_float<S>(v);
}

// tile[i][j] = A[m0 + i][r0 + j] as S, zero outside A.
template <typename T, typename S>
__device__ void load_act_tile(const TiledArgs<T>& args, int64_t m0, int64_t r0, S* tile) {
  constexpr int ld = kTileK + kPad;
  constexpr int kGroups = kTileM * kTileK / 8;
  for (int gi = threadIdx.x; gi < kGroups; gi += kThreads) {
    const int i = gi / (kTileK / 8);
    const int j = (gi % (kTileK / 8)) * 8;
    const int64_t m = m0 + i, r = r0 + j;
    S* dst = tile + i * ld + j;
    const T* src = args.a + m * args.R + r;
    if (args.vec_act && m < args.M && r + 8 <= args.R) {
      if constexpr (sizeof(T) == 2 && std::is_same<T, S>::value) {
        *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        alignas(16) T v[8];
        if constexpr (sizeof(T) == 4) {
          reinterpret_cast<float4*>(v)[0] = __ldg(reinterpret_cast<const float4*>(src));
          reinterpret_cast<float4*>(v)[1] = __ldg(reinterpret_cast<const float4*>(src) + 1);
        } else {
          *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(src));
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = to_smem<S>(to_float(v[e]));
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dst[e] = to_smem<S>(m < args.M && r + e < args.R ? to_float(src[e]) : 0.0f);
      }
    }
  }
}

// tile[i][j] = deq(W)[n0 + i][k0 + j] as S for i < rows, j < cols (cols % 8 == 0), zero
// outside W.
template <typename S>
__device__ void load_weight_tile(const Weight4bit& w, bool vec, const float* lut, int64_t n0,
                                 int rows, int64_t k0, int cols, S* tile, int ld) {
  const int groups_per_row = cols / 8;
  const int block_shift = log2_pow2(w.blocksize);  // a shift, not a 64-bit division
  for (int gi = threadIdx.x; gi < rows * groups_per_row; gi += kThreads) {
    const int i = gi / groups_per_row;
    const int j = (gi % groups_per_row) * 8;
    const int64_t n = n0 + i, k = k0 + j;
    S* dst = tile + i * ld + j;
    if (vec && n < w.N && k < w.K) {
      // K % 8 == 0: the 8 codes are one aligned 32-bit word, inside one scale block.
      const int64_t g = n * w.K + k;
      const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(w.packed + g / 2));
      const float scale = block_scale(w.scales, g >> block_shift);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t bits = (word >> (8 * b)) & 0xffu;
        dst[2 * b] = to_smem<S>(dequant_value(lut[bits >> 4], scale));
        dst[2 * b + 1] = to_smem<S>(dequant_value(lut[bits & 0x0fu], scale));
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float v = 0.0f;
        if (n < w.N && k + e < w.K) {
          const int64_t g = n * w.K + k + e;
          const uint8_t bits = w.packed[g >> 1];
          v = dequant_value(lut[nibble_of(bits, g)], block_scale(w.scales, g >> block_shift));
        }
        dst[e] = to_smem<S>(v);
      }
    }
  }
}

// Stages one main-loop step: the activation slice [m0, +kTileM) x [r0, +kTileK) and the
// weight slice it multiplies, decoded, then a barrier.
template <typename T, typename S, bool kGradInput>
__device__ __forceinline__ void stage_slices(const TiledArgs<T>& args, const float* lut, int64_t m0,
                                             int64_t r0, int64_t c0, S* a_tile, S* w_tile) {
  constexpr int kWLd = (kGradInput ? kTileN : kTileK) + kPad;
  load_act_tile<T, S>(args, m0, r0, a_tile);
  if (kGradInput) {
    load_weight_tile<S>(args.w, args.vec_weight, lut, r0, kTileK, c0, kTileN, w_tile, kWLd);
  } else {
    load_weight_tile<S>(args.w, args.vec_weight, lut, c0, kTileN, r0, kTileK, w_tile, kWLd);
  }
  __syncthreads();
}

template <typename T, bool kGradInput, bool kTensorCores>
__global__ void __launch_bounds__(kThreads)
    tiled_4bit_kernel(TiledArgs<T> args, Codebook4bit code) {
  using S = typename std::conditional<kTensorCores, T, float>::type;
  // The weight slice as rows of W: [n][k]. Forward: kTileN rows (output columns) x kTileK;
  // input gradient: kTileK rows (reduction) x kTileN.
  constexpr int kWRows = kGradInput ? kTileK : kTileN;
  constexpr int kWCols = kGradInput ? kTileN : kTileK;
  constexpr int kWLd = kWCols + kPad;
  constexpr int kALd = kTileK + kPad;
  __shared__ float lut[kCodebook4bitSize];
  __shared__ __align__(32) S a_tile[kTileM * kALd];
  __shared__ __align__(32) S w_tile[kWRows * kWLd];
  load_codebook(code, lut);

  const int warp = threadIdx.x / 32;
  // blockIdx.x is the column tile (plan_tiled gives every column tile a CTA), blockIdx.y
  // strides over the row tiles: no division. Column tiles vary fastest in launch order, so
  // CTAs running together share their activation rows in L2.
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  for (int64_t row_tile = blockIdx.y; row_tile < args.row_tiles; row_tile += gridDim.y) {
    const int64_t m0 = row_tile * kTileM;
    if constexpr (kTensorCores) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      // mma.sync m16n8k16 fed by ldmatrix (fp16 and bf16 alike; WMMA's bf16 loads do not
      // use LDSM). Fragment addressing: include/fourbit/detail/mma_layout.h, emulated and
      // checked on the CPU by tests/cpp/test_mma_layout.cpp.
      __shared__ __align__(32) float c_tile[kTileM * (kTileN + kCPad)];
      const int wm = warp / 2, wn = warp % 2;
      const int lane = threadIdx.x % 32;
      float acc[2][4][4];  // [16-row block i][8-column block j][register]
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
      const mma::Coord la = mma::a_ldsm(lane);
      const mma::Coord lb = kGradInput ? mma::b_ldsm_kn_trans(lane) : mma::b_ldsm_nk(lane);
      for (int64_t r0 = 0; r0 < args.R; r0 += kTileK) {
        stage_slices<T, S, kGradInput>(args, lut, m0, r0, c0, a_tile, w_tile);
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
          uint32_t a[2][4], b[4][2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            ldsm_x4(a[i], a_tile + (wm * 32 + i * 16 + la.row) * kALd + kk + la.col);
          }
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {  // 16 output columns per load: two n8 blocks
            const int n = wn * 32 + jj * 16;
            uint32_t r[4];
            if constexpr (kGradInput) {  // w_tile[k][n]: B(k, n) row-major, transposed load
              ldsm_x4_trans(r, w_tile + (kk + lb.row) * kWLd + n + lb.col);
            } else {                     // w_tile[n][k]: B(k, n) column-major
              ldsm_x4(r, w_tile + (n + lb.row) * kWLd + kk + lb.col);
            }
            b[2 * jj][0] = r[0];
            b[2 * jj][1] = r[1];
            b[2 * jj + 1][0] = r[2];
            b[2 * jj + 1][1] = r[3];
          }
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_16816<S>(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
      }
      constexpr int kCLd = kTileN + kCPad;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const mma::Coord o = mma::acc(lane, r);
            c_tile[(wm * 32 + i * 16 + o.row) * kCLd + wn * 32 + j * 8 + o.col] = acc[i][j][r];
          }
      __syncthreads();
      for (int e = threadIdx.x; e < kTileM * kTileN; e += kThreads) {
        const int i = e / kTileN, j = e % kTileN;
        const int64_t m = m0 + i, c = c0 + j;
        if (m < args.M && c < args.cols) {
          const float b = args.bias ? to_float(args.bias[c]) : 0.0f;
          args.c[m * args.cols + c] = from_float<T>(c_tile[i * kCLd + j] + b);
        }
      }
      __syncthreads();  // c_tile is rewritten by the next tile
#elif defined(__CUDA_ARCH__)
      // Device code for an arch below sm80 (e.g. PTX JIT-compiled from compute_75 when the
      // build has no sm80+ target): no tensor-core path here, and the host picks this kernel only
      // on sm80+. Fail loudly rather than return without writing C.
      __trap();
#endif
    } else {
      // CUDA cores: thread (ty, tx) owns rows ty + 8 i and columns tx + 16 j.
      const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
      float acc[8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
      for (int64_t r0 = 0; r0 < args.R; r0 += kTileK) {
        stage_slices<T, S, kGradInput>(args, lut, m0, r0, c0, a_tile, w_tile);
#pragma unroll 4
        for (int kk = 0; kk < kTileK; ++kk) {
          float a[8], b[4];
#pragma unroll
          for (int i = 0; i < 8; ++i) a[i] = a_tile[(ty + 8 * i) * kALd + kk];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int col = tx + 16 * j;
            b[j] = kGradInput ? w_tile[kk * kWLd + col] : w_tile[col * kWLd + kk];
          }
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t m = m0 + ty + 8 * i, c = c0 + tx + 16 * j;
          if (m < args.M && c < args.cols) {
            const float b = args.bias ? to_float(args.bias[c]) : 0.0f;
            args.c[m * args.cols + c] = from_float<T>(acc[i][j] + b);
          }
        }
      }
    }
  }
}

template <bool kGradInput>
void launch_tiled(const Weight4bit& w, const void* a, const void* bias, void* c, int64_t M,
                  int64_t R, int64_t cols, DType dtype, bool tensor_cores, cudaStream_t stream) {
  const Codebook4bit code = codebook_arg(w.quant_type);
  const plan::TiledPlan tiles = plan::plan_tiled(M, cols, max_grid_blocks());
  const dim3 grid(tiles.grid.x, tiles.grid.y);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    TiledArgs<T> args{w, static_cast<const T*>(a), static_cast<const T*>(bias), static_cast<T*>(c),
                      M, R, cols, tiles.row_tiles, w.K % 8 == 0 && aligned_to(w.packed, 4),
                      R % 8 == 0 && aligned_to(a, 16)};
    if constexpr (!std::is_same<T, float>::value) {
      if (tensor_cores) {
        tiled_4bit_kernel<T, kGradInput, true><<<grid, kThreads, 0, stream>>>(args, code);
        return;
      }
    }
    tiled_4bit_kernel<T, kGradInput, false><<<grid, kThreads, 0, stream>>>(args, code);
  });
  FOURBIT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_tiled_4bit_forward(const Gemm4bitParams& p, bool tensor_cores, cudaStream_t stream) {
  launch_tiled<false>(p.weight, p.x, p.bias, p.y, p.M, p.weight.K, p.weight.N, p.dtype,
                      tensor_cores, stream);
}

void launch_tiled_4bit_grad_input(const Gemm4bitGradInputParams& p, bool tensor_cores,
                                  cudaStream_t stream) {
  launch_tiled<true>(p.weight, p.grad_output, nullptr, p.grad_input, p.M, p.weight.N, p.weight.K,
                     p.dtype, tensor_cores, stream);
}

}  // namespace cuda
}  // namespace fourbit
