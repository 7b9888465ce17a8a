// Launch planning for the CUDA kernels as plain host functions: grid sizes, the vector /
// scalar split of dequantize, tile counts, and which matmul path runs for a shape. No CUDA
// types: the CPU build compiles it and tests/cpp/test_launch_plan.cpp checks it, so every
// size decision the GPU takes is unit-tested in CI. The .cu launchers call only these.
#pragma once

#include <cstdint>

#include "fourbit/types.h"

namespace fourbit {
namespace plan {

// CUDA's limits on one launch: gridDim.x <= 2^31 - 1, gridDim.y and gridDim.z <= 65535.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

// CTAs of a grid-stride kernel per SM: 32 CTAs of 256 threads fill an SM four times over
// (2048 threads), enough waves to balance uneven work without a tail of idle SMs.
constexpr int64_t kGridStrideCtasPerSm = 32;

// Elementwise kernels: threads per CTA (8 warps hide latency; small grids stay balanced).
constexpr int kElementwiseThreads = 256;

// Dequantize, vector path: a thread's item is one 8-element word (a 4-byte load of codes, a
// 16-byte store of bf16/fp16), so a warp's loads and stores are contiguous; each thread keeps
// 4 such loads in flight (its next grid-stride steps) before decoding.
constexpr int64_t kDequantWordElements = 8;
constexpr int kDequantWordsInFlight = 4;

// gemv: warps (weight rows in flight) per CTA, and the activation rows one pass takes (its
// accumulators are a register array of this size). Above it the weight would be re-read per
// row group; dequantize + cuBLAS reads it once and runs at GEMM speed.
constexpr int kGemvWarps = 8;
constexpr int64_t kGemvMaxRows = 8;

// Tiled kernels: the CTA's output tile.
constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 64;

struct Grid {
  uint32_t x = 1;
  uint32_t y = 1;
};

// ceil(a / b) for a >= 0, b > 0.
int64_t ceil_div(int64_t a, int64_t b);

// The CTA budget of a grid-stride launch on a device with `sm_count` SMs.
int64_t max_resident_ctas(int sm_count);

// CTAs for `work_items` items at `per_cta` items per CTA, in [1, min(max_ctas, kMaxGridX)]
// (a grid-stride loop covers the rest; zero items still launch nothing larger than 1).
uint32_t grid_stride_ctas(int64_t work_items, int64_t per_cta, int64_t max_ctas);

// dequantize_4bit: whole 8-element words take the vector kernel when `aligned` (packed
// 4-byte and out 16-byte aligned); elements from scalar_from on (the ragged end, or
// everything when unaligned) take the scalar kernel, one thread per packed byte. A kernel
// with no work has 0 CTAs and is not launched.
struct DequantizePlan {
  int64_t vector_words = 0;
  int64_t scalar_from = 0;
  uint32_t vector_ctas = 0;
  uint32_t scalar_ctas = 0;
};
DequantizePlan plan_dequantize_4bit(int64_t numel, bool aligned, int64_t max_ctas);

// gemv: one warp per output column, kGemvWarps per CTA; rows_per_pass = min(M, kGemvMaxRows).
struct GemvPlan {
  uint32_t ctas = 0;
  int rows_per_pass = 0;
};
GemvPlan plan_gemv(int64_t M, int64_t N, int64_t max_ctas);

// Tiled matmul C[M, cols]: blockIdx.x is the column tile (every column tile has its CTA, so
// the kernel needs no division to find it), blockIdx.y strides over the row tiles. Throws
// InvalidArgument when cols needs more than kMaxGridX column tiles.
struct TiledPlan {
  int64_t row_tiles = 0;
  int64_t col_tiles = 0;
  Grid grid;
};
TiledPlan plan_tiled(int64_t M, int64_t cols, int64_t max_ctas);

// Fused fragment-layout kernel (cuda/gemm_4bit_fused.cu). Two CTA shapes, 4 warps each:
// "small" 16 x 128 (one m16 fragment row, 4 warps side by side over N: decode-bound M,
// every warp streams its own weight) and "large" 64 x 64 (2 x 2 warps of 32 x 32: the
// activation tile is reused over twice as many columns per weight byte).
constexpr int kFusedThreads = 128;
constexpr int64_t kFusedSmallMaxM = 16;   // M up to this takes the 16-row tile
constexpr int64_t kFusedSmallTileM = 16, kFusedSmallTileN = 128;
constexpr int64_t kFusedLargeTileM = 64, kFusedLargeTileN = 64;
constexpr int64_t kFusedTileK = 64;       // one fragment tile deep per pipeline stage
constexpr int kFusedStages = 4;           // cp.async stages in flight (3 loads ahead of the math)
// Split-K: when the output tiles give fewer than kFusedWavesTarget CTAs per SM, the reduction
// is cut into splits of at least kFusedMinStagesPerSplit stages (so each split still fills its
// pipeline), at most kFusedMaxSplits (the fp32 partial sums cost splits x M x N x 4 bytes).
constexpr int64_t kFusedWavesTarget = 2;
constexpr int64_t kFusedMinStagesPerSplit = 8;
constexpr int64_t kFusedMaxSplits = 16;

struct FusedPlan {
  bool small = true;          // which CTA tile
  int64_t tile_m = 0, tile_n = 0;
  int64_t row_tiles = 0, col_tiles = 0;
  int64_t k_stages = 0;       // K / kFusedTileK
  int64_t splits = 1;         // K ranges; > 1 writes fp32 partials to the workspace
  int64_t stages_per_split = 0;
  int64_t workspace_bytes = 0;  // splits > 1: splits * M * N * 4
  Grid grid;                  // x: column tiles, y: row tiles (grid-stride beyond 65535)
  uint32_t grid_z = 1;        // splits
};
// Requires K % kFusedTileK == 0 (the fragment layout); M, N >= 0; sm_count > 0.
FusedPlan plan_fused(int64_t M, int64_t N, int64_t K, int sm_count);

// Input gradient dX[M, K] = dY[M, N] deq(W) on the same fragments: output columns are k (a warp
// owns one 64-deep fragment column, so the small tile is 16 x 256 and the large 64 x 128);
// the reduction runs over n in stages of kFusedTileK rows of W (the last one zero-padded).
constexpr int64_t kFusedGradSmallTileN = 256, kFusedGradLargeTileN = 128;
FusedPlan plan_fused_grad_input(int64_t M, int64_t N, int64_t K, int sm_count);

// Hopper (sm90a) fused forward (cuda/gemm_4bit_fused_sm90.cu), for training shapes (M >= 1024
// rows of X): wgmma.m64nNk16 with the decoded weight as the register A operand (W rows are
// wgmma's M: 64 per warpgroup) and X from shared memory as B (wgmma's N = the CTA's X rows).
// A CTA is kFusedSm90Warpgroups warpgroups over kFusedSm90TileN rows of W, all sharing one
// kFusedSm90TileM-row activation tile; blockIdx.x = the W-row tile, blockIdx.y strides over the
// X-row tiles. No split-K: at M >= 1024 the output tiles alone give several waves (Llama-8B's
// 4096 x 4096 at M = 1024: 32 x 8 = 256 CTAs on 132 SMs).
constexpr int kFusedSm90Warpgroups = 2;
constexpr int kFusedSm90Threads = 128 * kFusedSm90Warpgroups;
constexpr int64_t kFusedSm90TileN = 64 * kFusedSm90Warpgroups;  // W rows (output columns)
constexpr int64_t kFusedSm90TileM = 128;                        // X rows: wgmma's N
constexpr int kFusedSm90Stages = 4;                             // cp.async stages (3 ahead)
constexpr int64_t kFusedSm90MinM = 1024;  // the shapes it is meant for (the binding's doc; not enforced)
struct FusedSm90Plan {
  int64_t row_tiles = 0;  // X-row tiles of kFusedSm90TileM
  int64_t col_tiles = 0;  // W-row tiles of kFusedSm90TileN
  int64_t k_stages = 0;   // K / kFusedTileK
  Grid grid;              // x: col_tiles, y: min(row_tiles, kMaxGridY) (grid-stride beyond)
};
// Requires K % kFusedTileK == 0; M, N >= 0. Throws when N needs more than kMaxGridX tiles.
FusedSm90Plan plan_fused_sm90(int64_t M, int64_t N, int64_t K);

// Which path a 4-bit matmul takes. `has_blas`: the caller can run a dense GEMM (the torch
// binding, through cuBLAS); the core alone cannot.
enum class MatmulPath { Gemv, DequantizeBlas, TensorCoreTiled, CudaCoreTiled };

// Tensor cores: fp16 / bf16 operands on sm80 or newer (compute capability major * 10 + minor).
bool tensor_cores_usable(DType dtype, int compute_capability);

// Forward Y = X deq(W)^T: gemv up to kGemvMaxRows rows (bound by reading the packed weight
// once); above, dequantize into a workspace + a dense GEMM when there is one (the fused
// tiled kernel is estimated 3-4x slower than cuBLAS there); else the tiled kernels.
MatmulPath choose_forward(int64_t M, DType dtype, int compute_capability, bool has_blas);

// Input gradient dX = dY deq(W): there is no gemv form; dense GEMM when there is one.
MatmulPath choose_grad_input(int64_t M, DType dtype, int compute_capability, bool has_blas);

const char* to_string(MatmulPath path);

}  // namespace plan
}  // namespace fourbit
