// Launch planning for the CUDA kernels (include/fourbit/detail/launch_plan.h): host-only
// arithmetic, compiled into every build so that its tests run without a GPU.
#include "fourbit/detail/launch_plan.h"

#include <algorithm>

#include "fourbit/error.h"

namespace fourbit {
namespace plan {

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

int64_t max_resident_ctas(int sm_count) {
  FOURBIT_CHECK_ARG(sm_count > 0, "max_resident_ctas: sm_count must be > 0, got ", sm_count);
  return static_cast<int64_t>(sm_count) * kGridStrideCtasPerSm;
}

uint32_t grid_stride_ctas(int64_t work_items, int64_t per_cta, int64_t max_ctas) {
  FOURBIT_CHECK_ARG(per_cta > 0, "grid_stride_ctas: per_cta must be > 0, got ", per_cta);
  FOURBIT_CHECK_ARG(max_ctas > 0, "grid_stride_ctas: max_ctas must be > 0, got ", max_ctas);
  const int64_t needed = work_items > 0 ? ceil_div(work_items, per_cta) : 1;
  return static_cast<uint32_t>(std::min({needed, max_ctas, kMaxGridX}));
}

DequantizePlan plan_dequantize_4bit(int64_t numel, bool aligned, int64_t max_ctas) {
  FOURBIT_CHECK_ARG(numel >= 0, "plan_dequantize_4bit: numel must be >= 0, got ", numel);
  DequantizePlan p;
  p.vector_words = aligned ? numel / kDequantWordElements : 0;
  p.scalar_from = p.vector_words * kDequantWordElements;
  if (p.vector_words > 0) {
    p.vector_ctas = grid_stride_ctas(p.vector_words, int64_t{kElementwiseThreads} * kDequantWordsInFlight, max_ctas);
  }
  if (p.scalar_from < numel) {
    const int64_t bytes = (numel - p.scalar_from + 1) / 2;  // the scalar kernel: one per byte
    p.scalar_ctas = grid_stride_ctas(bytes, kElementwiseThreads, max_ctas);
  }
  return p;
}

GemvPlan plan_gemv(int64_t M, int64_t N, int64_t max_ctas) {
  FOURBIT_CHECK_ARG(M >= 0 && M <= kGemvMaxRows, "plan_gemv: M must be in [0, ", kGemvMaxRows,
                    "], got ", M);
  FOURBIT_CHECK_ARG(N >= 0, "plan_gemv: N must be >= 0, got ", N);
  GemvPlan p;
  p.rows_per_pass = static_cast<int>(M);
  if (M > 0 && N > 0) p.ctas = grid_stride_ctas(N, kGemvWarps, max_ctas);
  return p;
}

TiledPlan plan_tiled(int64_t M, int64_t cols, int64_t max_ctas) {
  FOURBIT_CHECK_ARG(M >= 0, "plan_tiled: M must be >= 0, got ", M);
  FOURBIT_CHECK_ARG(cols >= 0, "plan_tiled: cols must be >= 0, got ", cols);
  FOURBIT_CHECK_ARG(max_ctas > 0, "plan_tiled: max_ctas must be > 0, got ", max_ctas);
  TiledPlan p;
  p.row_tiles = ceil_div(M, kTileM);
  p.col_tiles = ceil_div(cols, kTileN);
  FOURBIT_CHECK_ARG(p.col_tiles <= kMaxGridX, "plan_tiled: cols = ", cols, " needs ", p.col_tiles,
                    " column tiles, more than one launch takes (", kMaxGridX, ")");
  p.grid.x = static_cast<uint32_t>(std::max<int64_t>(p.col_tiles, 1));
  // Rows: enough CTAs in all to fill the device, never more than there are row tiles.
  const int64_t rows_for_budget = std::max<int64_t>(max_ctas / p.grid.x, 1);
  p.grid.y = static_cast<uint32_t>(std::max<int64_t>(std::min({p.row_tiles, rows_for_budget, kMaxGridY}), 1));
  return p;
}

namespace {
// Shared by both directions: `cols` output columns, `reduction` summed over.
FusedPlan plan_fused_tiles(int64_t M, int64_t cols, int64_t reduction, int sm_count, int64_t small_n,
                           int64_t large_n) {
  FusedPlan p;
  p.small = M <= kFusedSmallMaxM;
  p.tile_m = p.small ? kFusedSmallTileM : kFusedLargeTileM;
  p.tile_n = p.small ? small_n : large_n;
  p.row_tiles = ceil_div(M, p.tile_m);
  p.col_tiles = ceil_div(cols, p.tile_n);
  FOURBIT_CHECK_ARG(p.col_tiles <= kMaxGridX, "plan_fused: ", cols, " output columns need too many tiles");
  p.k_stages = ceil_div(reduction, kFusedTileK);
  const int64_t tiles = p.row_tiles * p.col_tiles;
  const int64_t want = kFusedWavesTarget * sm_count;
  int64_t splits = 1;
  if (tiles > 0 && tiles < want) {
    splits = std::min({ceil_div(want, tiles), kFusedMaxSplits,
                       std::max<int64_t>(p.k_stages / kFusedMinStagesPerSplit, 1)});
  }
  p.stages_per_split = ceil_div(p.k_stages, splits);
  p.splits = ceil_div(p.k_stages, p.stages_per_split);  // no empty split
  p.workspace_bytes = p.splits > 1 ? p.splits * M * cols * 4 : 0;
  p.grid.x = static_cast<uint32_t>(std::max<int64_t>(p.col_tiles, 1));
  p.grid.y = static_cast<uint32_t>(std::max<int64_t>(std::min(p.row_tiles, kMaxGridY), 1));
  p.grid_z = static_cast<uint32_t>(p.splits);
  return p;
}
}  // namespace

FusedPlan plan_fused(int64_t M, int64_t N, int64_t K, int sm_count) {
  FOURBIT_CHECK_ARG(M >= 0 && N >= 0, "plan_fused: M and N must be >= 0, got ", M, ", ", N);
  FOURBIT_CHECK_ARG(K > 0 && K % kFusedTileK == 0, "plan_fused: K must be a positive multiple of ",
                    kFusedTileK, ", got ", K);
  FOURBIT_CHECK_ARG(sm_count > 0, "plan_fused: sm_count must be > 0, got ", sm_count);
  return plan_fused_tiles(M, N, K, sm_count, kFusedSmallTileN, kFusedLargeTileN);
}

FusedPlan plan_fused_grad_input(int64_t M, int64_t N, int64_t K, int sm_count) {
  FOURBIT_CHECK_ARG(M >= 0 && N >= 0, "plan_fused_grad_input: M and N must be >= 0, got ", M, ", ", N);
  FOURBIT_CHECK_ARG(K > 0 && K % kFusedTileK == 0, "plan_fused_grad_input: K must be a positive "
                    "multiple of ", kFusedTileK, ", got ", K);
  FOURBIT_CHECK_ARG(sm_count > 0, "plan_fused_grad_input: sm_count must be > 0, got ", sm_count);
  if (N == 0) return plan_fused_tiles(M, K, kFusedTileK, sm_count, kFusedGradSmallTileN, kFusedGradLargeTileN);
  return plan_fused_tiles(M, K, N, sm_count, kFusedGradSmallTileN, kFusedGradLargeTileN);
}

FusedSm90Plan plan_fused_sm90(int64_t M, int64_t N, int64_t K) {
  FOURBIT_CHECK_ARG(M >= 0 && N >= 0, "plan_fused_sm90: M and N must be >= 0, got ", M, ", ", N);
  FOURBIT_CHECK_ARG(K > 0 && K % kFusedTileK == 0, "plan_fused_sm90: K must be a positive multiple of ",
                    kFusedTileK, ", got ", K);
  FusedSm90Plan p;
  p.row_tiles = ceil_div(M, kFusedSm90TileM);
  p.col_tiles = ceil_div(N, kFusedSm90TileN);
  FOURBIT_CHECK_ARG(p.col_tiles <= kMaxGridX, "plan_fused_sm90: N = ", N, " needs too many tiles");
  p.k_stages = K / kFusedTileK;
  p.grid.x = static_cast<uint32_t>(std::max<int64_t>(p.col_tiles, 1));
  p.grid.y = static_cast<uint32_t>(std::max<int64_t>(std::min(p.row_tiles, kMaxGridY), 1));
  return p;
}

bool tensor_cores_usable(DType dtype, int compute_capability) {
  return dtype != DType::Float32 && compute_capability >= 80;
}

namespace {
MatmulPath tiled(DType dtype, int compute_capability) {
  return tensor_cores_usable(dtype, compute_capability) ? MatmulPath::TensorCoreTiled
                                                        : MatmulPath::CudaCoreTiled;
}
}  // namespace

MatmulPath choose_forward(int64_t M, DType dtype, int compute_capability, bool has_blas) {
  if (M <= kGemvMaxRows) return MatmulPath::Gemv;
  if (has_blas) return MatmulPath::DequantizeBlas;
  return tiled(dtype, compute_capability);
}

MatmulPath choose_grad_input(int64_t M, DType dtype, int compute_capability, bool has_blas) {
  (void)M;  // every M: the dense GEMM beats the tiled kernel; there is no gemv form
  if (has_blas) return MatmulPath::DequantizeBlas;
  return tiled(dtype, compute_capability);
}

const char* to_string(MatmulPath path) {
  switch (path) {
    case MatmulPath::Gemv: return "gemv";
    case MatmulPath::DequantizeBlas: return "dequantize+blas";
    case MatmulPath::TensorCoreTiled: return "tensor_core_tiled";
    case MatmulPath::CudaCoreTiled: return "cuda_core_tiled";
  }
  return "unknown";
}

}  // namespace plan
}  // namespace fourbit
