// Fused 4-bit matmul for Hopper (sm_90a), forward only: Y = X @ deq(W)^T (+ bias), X and Y fp16
// or bf16, fp32 accumulation, on the fragment layout -- for training shapes (M >= 1024 rows of X;
// any M is correct). The product is computed transposed, Y^T = deq(W) X^T, so that the decoded
// weight is wgmma's register A operand:
//
//   wgmma.mma_async.m64n128k16   A = 64 rows of W x 16 k   registers, decoded fragment words
//                                B = 16 k x 128 rows of X   shared memory, matrix descriptor
//                                D = 64 x 128 fp32           64 registers per thread
//
// CTA (plan::plan_fused_sm90): 2 warpgroups (256 threads) over 128 rows of W (warpgroup g: W rows
// 64 g .. 64 g + 63, warp w of it: fragment tile 4 g + w) and 128 rows of X shared by both.
//
//        X tile (128 rows, one 64-deep stage)  ->  B of both warpgroups (same descriptor)
//   W rows  0-63  : warpgroup 0, warps 0-3 = fragment tiles 0-3   ->  D[64 x 128]
//   W rows 64-127 : warpgroup 1, warps 4-7 = fragment tiles 4-7   ->  D[64 x 128]
//
// Layout contract: W in the fragment layout (include/fourbit/detail/fragment_layout.h), scales
// transposed (fp32 or the nested uint8 form); X row-major [M, K], 16-byte aligned, K % 64 == 0.
// The activation stage is the no-swizzle K-major core-matrix layout of
// include/fourbit/detail/wgmma_smem.h (descriptor and layout proven on the CPU by
// tests/cpp/test_wgmma_smem.cpp; the A and accumulator maps by test_fragment_layout.cpp).
//
// Per 64-deep stage (kStages-deep cp.async ring, as the sm80 kernel's):
//   cp.async.wait_group -> fence.proxy.async (cp.async writes are generic-proxy; wgmma reads
//   B through the async proxy) -> __syncthreads -> issue the load kStages - 1 ahead ->
//   decode 4 k16 steps of A (16 registers) -> wgmma.fence -> 4 x wgmma -> commit ->
//   wait_group 0 (the slot may be overwritten from the next iteration on, and A reused).
//
// Limits of this first version (nothing here is measured): the wgmma of a stage does not
// overlap the decode of the next (wait_group 0 each stage; the two warpgroups and the
// cp.async ring are the overlap); activations come by cp.async, not TMA; the epilogue writes
// Y straight from the accumulator map (16-byte runs per 8 lanes, not staged through shared
// memory); no split-K (M >= 1024 gives enough CTAs); no input-gradient kernel (algo
// "fused_sm90"'s backward runs the sm80 fused one).
//
// Built for sm_90a only: elsewhere (sm_80, plain sm_90 PTX) the kernel body is a trap and the
// host never launches it (fused_sm90_supported: compute capability 9.0 and a probe kernel that
// reports whether this build holds sm_90a code).
#include <type_traits>

#include "common.cuh"
#include "fourbit/detail/fragment_layout.h"
#include "fourbit/detail/launch_plan.h"
#include "fourbit/detail/mma_layout.h"
#include "fourbit/detail/wgmma_smem.h"
#include "fourbit/gemm_fused.h"
#include "mma_sm80.cuh"
#include "weight_4bit.cuh"
#include "wgmma_sm90.cuh"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kThreads = plan::kFusedSm90Threads;                  // 256: two warpgroups
constexpr int kStages = plan::kFusedSm90Stages;
constexpr int kTileW = static_cast<int>(plan::kFusedSm90TileN);    // 128 rows of W per CTA
constexpr int kTileX = static_cast<int>(plan::kFusedSm90TileM);    // 128 rows of X: wgmma's N
constexpr int kTileK = static_cast<int>(plan::kFusedTileK);        // 64: one fragment tile deep
static_assert(kTileK == frag::kTileK && kTileK == wgmma::kStageK, "one fragment tile per stage");
static_assert(kTileX == 128, "the wgmma wrapper is m64n128k16");
static_assert(kTileW == 64 * (kThreads / 128), "one warpgroup per 64 rows of W");
constexpr int kAcc = kTileX / 2;                                   // fp32 accumulators per thread
constexpr int kScaleRows = 2;          // scale blocks at k offsets 0 and 32 of a stage (as sm80)
constexpr int kNestedCodeSize = 256;
constexpr int kXBytes = (kTileX / 8) * static_cast<int>(wgmma::kSbo);      // 16 KB
constexpr int kWBytes = (kTileW / frag::kTileN) * frag::kTileBytes;        // 4 KB
constexpr int kSBytes = kScaleRows * kTileW * 4;                           // fp32; nested use 1/4
constexpr int kStageBytes = kXBytes + kWBytes + kSBytes;
constexpr int kSmemBytes = kStages * kStageBytes;                          // 84 KB
static_assert(kXBytes % 128 == 0 && kStageBytes % 128 == 0, "stages keep 128-byte alignment");
static_assert(kSmemBytes <= 227 * 1024, "fits sm90's opt-in shared memory");
static_assert(kAcc == 64 && kNestedCodeSize * sizeof(float) <= 1024, "64 accumulators; a 1 KB nested code");

template <typename T>
struct Sm90Args {
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
  int64_t M, N, K;
  int64_t n_tiles, n_pad, blocks_per_row;
  int64_t row_tiles, k_stages;
};

// cp.async of global stage `st` (k in [64 st, 64 st + 64)) into one ring slot: the X tile in
// the wgmma_smem layout (chunk c at byte 16 c), then the W fragment tiles, then the scale rows.
template <typename T, bool kNested>
__device__ __forceinline__ void load_stage(const Sm90Args<T>& args, int64_t m0, int64_t n0, int64_t st,
                                           unsigned char* slot, uint64_t policy) {
  const int64_t k0 = st * kTileK;
  constexpr int kXChunks = kTileX * (kTileK / 8);
  static_assert(kXChunks % kThreads == 0, "whole passes over the activation chunks");
#pragma unroll
  for (int i = 0; i < kXChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const wgmma::Chunk ch = wgmma::x_chunk(c);
    const int64_t m = m0 + ch.row;
    const bool valid = m < args.M;
    cp_async_16(slot + 16 * c, args.x + (valid ? m : 0) * args.K + k0 + 8 * ch.kc, valid);
  }
  unsigned char* w_s = slot + kXBytes;
  constexpr int kWChunks = (kTileW / frag::kTileN) * frag::kLanes;
  static_assert(kWChunks % kThreads == 0, "whole passes over the weight chunks");
  const int64_t nt0 = n0 >> 4;
#pragma unroll
  for (int i = 0; i < kWChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int t = c >> 5, ch = c & 31;
    const int64_t nt = nt0 + t;
    const bool valid = nt < args.n_tiles;
    const uint8_t* src = args.frag + ((st * args.n_tiles + (valid ? nt : 0)) * frag::kTileBytes + ch * 16);
    cp_async_16_hint(w_s + t * frag::kTileBytes + ch * 16, src, valid, policy);
  }
  unsigned char* s_s = w_s + kWBytes;
  constexpr int esize_shift = kNested ? 0 : 2;
  constexpr int per_row = (kTileW << esize_shift) >> 4;
  constexpr int kSChunks = kScaleRows * per_row;
  static_assert(kSChunks <= kThreads, "one guarded pass over the scale chunks");
  const int c = threadIdx.x;
  if (c < kSChunks) {
    const int r = c >= per_row ? 1 : 0;
    const int ch = c - r * per_row;
    const int64_t kb = (k0 + 32 * r) >> args.block_shift;
    const int64_t n = n0 + ((ch * 16) >> esize_shift);
    const bool valid = n < args.n_pad;
    const unsigned char* base = kNested ? args.absmax_q : reinterpret_cast<const unsigned char*>(args.absmax);
    const int64_t index = valid ? (kb * args.n_pad + n) : 0;
    cp_async_16(s_s + ((r * kTileW) << esize_shift) + ch * 16, base + (index << esize_shift), valid);
  }
}

// One CTA: W rows [128 blockIdx.x, + 128) x X rows [128 rt, + 128) for rt = blockIdx.y, +
// gridDim.y, ... One CTA per SM is the floor (84 KB of shared memory and 64 accumulators a
// thread allow two); __launch_bounds__(.., 1) lets ptxas use up to 255 registers.
template <typename T, bool kNested>
__global__ void __launch_bounds__(kThreads, 1)
    fused_4bit_sm90_kernel(Sm90Args<T> args, Codebook4bit code) {
#if !defined(FOURBIT_SM90A_DEVICE)
  // Not an sm_90a target: wgmma does not exist here, and the host launches this kernel only
  // where the probe says the sm_90a code is loaded. Fail loudly rather than write nothing.
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float lut[kCodebook4bitSize];
  __shared__ float nested_code[kNestedCodeSize];
  if (kNested) {
    for (int i = threadIdx.x; i < kNestedCodeSize; i += kThreads) nested_code[i] = args.nested_code[i];
  }
  load_codebook(code, lut);  // ends with __syncthreads
  const float offset = kNested ? __ldg(args.offset) : 0.0f;
  const uint64_t policy = l2_evict_first_policy();

  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int tile = 4 * wg + warp;  // this warp's fragment tile within the CTA
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileW;
  const int64_t steps = args.k_stages;
  constexpr int esize_shift = kNested ? 0 : 2;

  for (int64_t rt = blockIdx.y; rt < args.row_tiles; rt += gridDim.y) {
    const int64_t m0 = rt * kTileX;
    float acc[kAcc];
#pragma unroll
    for (int r = 0; r < kAcc; ++r) acc[r] = 0.0f;

#pragma unroll 1
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < steps) load_stage<T, kNested>(args, m0, n0, s, smem + s * kStageBytes, policy);
      cp_async_commit();
    }
    int read_slot = 0, write_slot = kStages - 1;
    for (int64_t it = 0; it < steps; ++it) {
      cp_async_wait<kStages - 2>();   // stage `it` has landed for this thread ...
      fence_proxy_async_shared();     // ... and is visible to the async proxy (wgmma's B)
      __syncthreads();                // ... for every thread; every wgmma on write_slot is done
      if (it + kStages - 1 < steps) {
        load_stage<T, kNested>(args, m0, n0, it + kStages - 1, smem + write_slot * kStageBytes, policy);
      }
      cp_async_commit();

      unsigned char* slot = smem + read_slot * kStageBytes;
      const unsigned char* w_s = slot + kXBytes;
      const unsigned char* s_s = w_s + kWBytes;
      const int64_t k0 = it * kTileK;
      float sc[kScaleRows][2];
#pragma unroll
      for (int r = 0; r < kScaleRows; ++r) {
        const int64_t kb = (k0 + 32 * r) >> args.block_shift;
        const unsigned char* s_row = s_s + ((r * kTileW) << esize_shift);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n_local = tile * 16 + 8 * j + (lane >> 2);
          sc[r][j] = fragment_stage_scale<kNested>(args, s_row, n_local, n0 + n_local, kb, nested_code, offset);
        }
      }
      // A for the stage's four k16 steps: register q = (n8 half q % 2, pair q / 2), the
      // mma::wgmma_a_reg order (test_fragment_layout: WarpgroupEmulationWgmmaRegisterA...).
      const uint4 wv = *reinterpret_cast<const uint4*>(w_s + tile * frag::kTileBytes + lane * frag::kLaneBytes);
      uint32_t a[frag::kWordsPerLane][4];
#pragma unroll
      for (int s = 0; s < frag::kWordsPerLane; ++s) {
        const uint32_t word = s == 0 ? wv.x : s == 1 ? wv.y : s == 2 ? wv.z : wv.w;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v[4];
          frag::decode_word(word, j, lut, sc[s >> 1][j], v);
          a[s][j] = pack2<T>(v[0], v[1]);
          a[s][2 + j] = pack2<T>(v[2], v[3]);
        }
      }
      const uint32_t x_tile = smem_u32(slot);
#pragma unroll
      for (int r = 0; r < kAcc; ++r) wgmma_fence_operand(acc[r]);
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < frag::kWordsPerLane; ++s) {
        wgmma_m64n128k16_rs<T>(acc, a[s], wgmma::x_step_desc(x_tile, s));
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int r = 0; r < kAcc; ++r) wgmma_fence_operand(acc[r]);
      read_slot = read_slot == kStages - 1 ? 0 : read_slot + 1;
      write_slot = write_slot == kStages - 1 ? 0 : write_slot + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // every slot is free before the next row tile's prologue

    // Epilogue: accumulator r holds (W row, X row) = mma::wgmma_acc(warp, lane, r) of this
    // warpgroup's 64 x 128 tile; Y[m][n] = that + bias[n], rounded once.
#pragma unroll
    for (int r = 0; r < kAcc; ++r) {
      const mma::Coord o = mma::wgmma_acc(warp, lane, r);
      const int64_t n = n0 + 64 * wg + o.row;
      const int64_t m = m0 + o.col;
      if (m < args.M && n < args.N) {
        const float bias = args.bias != nullptr ? to_float(args.bias[n]) : 0.0f;
        args.y[m * args.N + n] = from_float<T>(acc[r] + bias);
      }
    }
  }
#endif
}

// Writes 1 when the code loaded for this device is sm_90a's (the fused kernel's body is real).
__global__ void __launch_bounds__(32) fused_sm90_probe_kernel(int* out) {
#if defined(FOURBIT_SM90A_DEVICE)
  if (threadIdx.x == 0) *out = 1;
#else
  if (threadIdx.x == 0) *out = 0;
#endif
}

template <typename T, bool kNested>
void launch(const Sm90Args<T>& args, const plan::FusedSm90Plan& p, QuantType quant_type, cudaStream_t stream) {
  const auto kernel = fused_4bit_sm90_kernel<T, kNested>;
  FOURBIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<dim3(p.grid.x, p.grid.y), kThreads, kSmemBytes, stream>>>(args, codebook_arg(quant_type));
  FOURBIT_CUDA_LAUNCH_CHECK();
}

int probe_sm90a() {
  int* flag = nullptr;
  int host = 0;
  FOURBIT_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
  fused_sm90_probe_kernel<<<1, 32>>>(flag);
  const cudaError_t launched = cudaGetLastError();
  const cudaError_t copied = launched == cudaSuccess ? cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost)
                                                     : launched;
  cudaFree(flag);
  FOURBIT_CUDA_CHECK(copied);
  return host;
}

}  // namespace
}  // namespace cuda

bool fused_sm90_supported() {
  if (cuda::compute_capability() != 90) return false;  // sm_90a code runs on 9.0 only
  constexpr int kMaxDevices = 64;
  static int known[kMaxDevices] = {};  // 0: not probed, 1: no, 2: yes
  int device = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) return cuda::probe_sm90a() == 1;
  if (known[device] == 0) known[device] = cuda::probe_sm90a() == 1 ? 2 : 1;
  return known[device] == 2;
}

void gemm_4bit_fused_sm90_cuda(const Gemm4bitParams& p, cudaStream_t stream) {
  const Weight4bit& w = p.weight;
  const char* op = "gemm_4bit_fused_sm90_cuda";
  FOURBIT_CHECK_ARG(fragment_layout_supported(w), op, ": the fragment layout needs K % 64 == 0 and "
                    "K % blocksize == 0, got N=", w.N, " K=", w.K, " blocksize=", w.blocksize);
  FOURBIT_CHECK_ARG(p.dtype == DType::BFloat16 || p.dtype == DType::Float16, op,
                    ": dtype must be bfloat16 or float16, got ", to_string(p.dtype));
  FOURBIT_CHECK_ARG(p.M >= 0, op, ": M must be >= 0, got ", p.M);
  FOURBIT_CHECK_ARG(fused_sm90_supported(), op, ": needs an sm90 (Hopper) device and a build with sm_90a "
                    "code (FOURBIT_CUDA_ARCHS containing 90a), got sm", cuda::compute_capability());
  if (p.M == 0 || w.N == 0) return;
  const void* scales = w.scales.nested() ? static_cast<const void*>(w.scales.absmax_q)
                                         : static_cast<const void*>(w.scales.absmax);
  FOURBIT_CHECK_ARG(w.packed && scales && p.x && p.y, op, ": null pointer");
  FOURBIT_CHECK_ARG(cuda::aligned_to(p.x, 16) && cuda::aligned_to(w.packed, 16) && cuda::aligned_to(scales, 16), op,
                    ": the activations, the fragment bytes and the scales must be 16-byte aligned");
  FOURBIT_CHECK_ARG(!w.scales.nested() || (w.scales.nested_code && w.scales.nested_absmax && w.scales.offset),
                    op, ": nested scales need nested_code, nested_absmax and offset");
  FOURBIT_CHECK_ARG(w.blocksize >= 32, op, ": blocksize must be >= 32 (two scale rows per stage), got ",
                    w.blocksize);
  const plan::FusedSm90Plan plan = plan::plan_fused_sm90(p.M, w.N, w.K);
  const frag::Shape s = frag::shape_of(w.N, w.K);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      const cuda::Sm90Args<T> args{w.packed, w.scales.absmax, w.scales.absmax_q, w.scales.nested_code,
                                   w.scales.nested_absmax, w.scales.offset, cuda::log2_pow2(w.blocksize),
                                   w.scales.nested() ? cuda::log2_pow2(w.scales.nested_blocksize) : 0,
                                   static_cast<const T*>(p.x), static_cast<const T*>(p.bias), static_cast<T*>(p.y),
                                   p.M, w.N, w.K, s.n_tiles, s.n_pad(), w.K / w.blocksize, plan.row_tiles,
                                   plan.k_stages};
      if (w.scales.nested()) {
        cuda::launch<T, true>(args, plan, w.quant_type, stream);
      } else {
        cuda::launch<T, false>(args, plan, w.quant_type, stream);
      }
    }
  });
}

}  // namespace fourbit
