// Launch planning (include/fourbit/detail/launch_plan.h): the grid and path decisions the
// CUDA launchers take, checked without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "fourbit/detail/launch_plan.h"
#include "fourbit/error.h"

namespace {

namespace plan = fourbit::plan;
using fourbit::DType;

constexpr int kH100Sms = 132;
const int64_t kBudget = plan::max_resident_ctas(kH100Sms);

TEST(LaunchPlan, CeilDiv) {
  EXPECT_EQ(plan::ceil_div(0, 64), 0);
  EXPECT_EQ(plan::ceil_div(1, 64), 1);
  EXPECT_EQ(plan::ceil_div(64, 64), 1);
  EXPECT_EQ(plan::ceil_div(65, 64), 2);
  EXPECT_EQ(plan::ceil_div(INT64_MAX, 1), INT64_MAX);  // no overflow at the top
  EXPECT_EQ(plan::ceil_div(INT64_MAX, 2), int64_t{1} << 62);
}

TEST(LaunchPlan, GridStrideCtasStayWithinOneAndTheBudget) {
  EXPECT_EQ(kBudget, kH100Sms * plan::kGridStrideCtasPerSm);
  EXPECT_EQ(plan::grid_stride_ctas(0, 256, kBudget), 1u);
  EXPECT_EQ(plan::grid_stride_ctas(1, 256, kBudget), 1u);
  EXPECT_EQ(plan::grid_stride_ctas(257, 256, kBudget), 2u);
  EXPECT_EQ(plan::grid_stride_ctas(int64_t{1} << 40, 256, kBudget), static_cast<uint32_t>(kBudget));
  // A budget above CUDA's gridDim.x limit is cut to the limit.
  EXPECT_EQ(plan::grid_stride_ctas(int64_t{1} << 50, 1, int64_t{1} << 40),
            static_cast<uint32_t>(plan::kMaxGridX));
  EXPECT_THROW(plan::grid_stride_ctas(10, 0, kBudget), fourbit::Error);
  EXPECT_THROW(plan::max_resident_ctas(0), fourbit::Error);
}

TEST(LaunchPlan, DequantizeSplitCoversEveryElementOnce) {
  for (int64_t numel : {int64_t{0}, int64_t{1}, int64_t{31}, int64_t{32}, int64_t{33}, int64_t{4095},
                        int64_t{4096} * 14336, (int64_t{1} << 31) + 17, int64_t{5} << 32}) {
    for (bool aligned : {false, true}) {
      const plan::DequantizePlan p = plan::plan_dequantize_4bit(numel, aligned, kBudget);
      EXPECT_EQ(p.scalar_from, p.vector_words * plan::kDequantWordElements);
      EXPECT_LE(p.scalar_from, numel);
      EXPECT_LT(numel - p.scalar_from, aligned ? plan::kDequantWordElements : numel + 1);
      if (!aligned) EXPECT_EQ(p.vector_words, 0);
      EXPECT_EQ(p.vector_ctas > 0, p.vector_words > 0) << numel;
      EXPECT_EQ(p.scalar_ctas > 0, p.scalar_from < numel) << numel;
      EXPECT_LE(p.vector_ctas, kBudget);
      EXPECT_LE(p.scalar_ctas, kBudget);
    }
  }
  // More than 2^31 elements: the vector part alone holds 2^30 words; the counts are int64.
  const plan::DequantizePlan big = plan::plan_dequantize_4bit((int64_t{1} << 33) + 5, true, kBudget);
  EXPECT_EQ(big.vector_words, (int64_t{1} << 33) / 8);
  EXPECT_EQ(big.vector_ctas, static_cast<uint32_t>(kBudget));
  EXPECT_EQ(big.scalar_from, int64_t{1} << 33);
  EXPECT_EQ(big.scalar_ctas, 1u);  // 5 elements, 3 bytes
  // A CTA takes 256 threads x 4 words in flight = 1024 words: 4096 elements (512 words) is
  // one CTA, 8200 elements (1025 words) two.
  EXPECT_EQ(plan::plan_dequantize_4bit(4096, true, kBudget).vector_ctas, 1u);
  EXPECT_EQ(plan::plan_dequantize_4bit(8200, true, kBudget).vector_ctas, 2u);
  EXPECT_THROW(plan::plan_dequantize_4bit(-1, true, kBudget), fourbit::Error);
}

TEST(LaunchPlan, GemvOneWarpPerColumn) {
  const plan::GemvPlan one = plan::plan_gemv(1, 1, kBudget);
  EXPECT_EQ(one.ctas, 1u);
  EXPECT_EQ(one.rows_per_pass, 1);
  EXPECT_EQ(plan::plan_gemv(8, 4096, kBudget).ctas, 4096u / plan::kGemvWarps);
  EXPECT_EQ(plan::plan_gemv(3, 4097, kBudget).ctas, 4096u / plan::kGemvWarps + 1);
  EXPECT_EQ(plan::plan_gemv(1, int64_t{1} << 32, kBudget).ctas, static_cast<uint32_t>(kBudget));
  EXPECT_EQ(plan::plan_gemv(0, 4096, kBudget).ctas, 0u);  // nothing to launch
  EXPECT_EQ(plan::plan_gemv(2, 0, kBudget).ctas, 0u);
  EXPECT_THROW(plan::plan_gemv(9, 4096, kBudget), fourbit::Error);
}

TEST(LaunchPlan, TiledGridGivesEveryColumnTileACta) {
  const plan::TiledPlan p = plan::plan_tiled(100, 4096, kBudget);
  EXPECT_EQ(p.row_tiles, 2);
  EXPECT_EQ(p.col_tiles, 64);
  EXPECT_EQ(p.grid.x, 64u);
  EXPECT_EQ(p.grid.y, 2u);

  const plan::TiledPlan n1 = plan::plan_tiled(9, 1, kBudget);  // N = 1
  EXPECT_EQ(n1.col_tiles, 1);
  EXPECT_EQ(n1.grid.x, 1u);
  EXPECT_EQ(n1.grid.y, 1u);

  const plan::TiledPlan m0 = plan::plan_tiled(0, 4096, kBudget);  // M = 0: a valid (empty) launch
  EXPECT_EQ(m0.row_tiles, 0);
  EXPECT_GE(m0.grid.y, 1u);

  // Many row tiles: y is cut to the CTA budget (the kernel strides) and to 65535.
  const plan::TiledPlan tall = plan::plan_tiled(int64_t{1} << 31, 64, kBudget);
  EXPECT_EQ(tall.row_tiles, (int64_t{1} << 31) / 64);
  EXPECT_EQ(tall.grid.x, 1u);
  EXPECT_EQ(tall.grid.y, static_cast<uint32_t>(std::min<int64_t>(kBudget, plan::kMaxGridY)));
  const plan::TiledPlan huge_budget = plan::plan_tiled(int64_t{1} << 31, 64, int64_t{1} << 40);
  EXPECT_EQ(huge_budget.grid.y, static_cast<uint32_t>(plan::kMaxGridY));
  // Wide outputs: more column tiles than the budget still get one CTA each, one row of them.
  const plan::TiledPlan wide = plan::plan_tiled(4096, int64_t{1} << 24, kBudget);
  EXPECT_EQ(wide.grid.x, static_cast<uint32_t>((int64_t{1} << 24) / 64));
  EXPECT_EQ(wide.grid.y, 1u);
  // Odd sizes round up.
  EXPECT_EQ(plan::plan_tiled(65, 65, kBudget).grid.x, 2u);
  EXPECT_EQ(plan::plan_tiled(65, 65, kBudget).row_tiles, 2);
  // Beyond one launch's gridDim.x: refused with the value named.
  try {
    plan::plan_tiled(1, (plan::kMaxGridX + 1) * 64, kBudget);
    FAIL() << "expected an error";
  } catch (const fourbit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cols = "), std::string::npos) << e.what();
  }
}

TEST(LaunchPlan, MatmulPathByShapeDtypeAndArchitecture) {
  using plan::MatmulPath;
  for (int64_t M : {0, 1, 8}) {
    EXPECT_EQ(plan::choose_forward(M, DType::BFloat16, 90, true), MatmulPath::Gemv) << M;
    EXPECT_EQ(plan::choose_forward(M, DType::Float32, 75, false), MatmulPath::Gemv) << M;
  }
  EXPECT_EQ(plan::choose_forward(9, DType::BFloat16, 90, true), MatmulPath::DequantizeBlas);
  EXPECT_EQ(plan::choose_forward(4096, DType::Float16, 80, true), MatmulPath::DequantizeBlas);
  EXPECT_EQ(plan::choose_forward(9, DType::BFloat16, 90, false), MatmulPath::TensorCoreTiled);
  EXPECT_EQ(plan::choose_forward(9, DType::Float16, 75, false), MatmulPath::CudaCoreTiled);
  EXPECT_EQ(plan::choose_forward(9, DType::Float32, 90, false), MatmulPath::CudaCoreTiled);
  EXPECT_EQ(plan::choose_grad_input(1, DType::BFloat16, 90, true), MatmulPath::DequantizeBlas);
  EXPECT_EQ(plan::choose_grad_input(1, DType::BFloat16, 90, false), MatmulPath::TensorCoreTiled);
  EXPECT_EQ(plan::choose_grad_input(4096, DType::Float32, 90, false), MatmulPath::CudaCoreTiled);
  EXPECT_STREQ(plan::to_string(MatmulPath::DequantizeBlas), "dequantize+blas");
  EXPECT_TRUE(plan::tensor_cores_usable(DType::BFloat16, 80));
  EXPECT_FALSE(plan::tensor_cores_usable(DType::BFloat16, 75));
  EXPECT_FALSE(plan::tensor_cores_usable(DType::Float32, 90));
}

TEST(LaunchPlan, FusedSm90TilesTheOutputWithoutSplitK) {
  // Llama-8B's q/o projection at a training batch: 4096 x 4096, M = 2048.
  plan::FusedSm90Plan p = plan::plan_fused_sm90(2048, 4096, 4096);
  EXPECT_EQ(p.row_tiles, 16);
  EXPECT_EQ(p.col_tiles, 32);
  EXPECT_EQ(p.k_stages, 64);
  EXPECT_EQ(p.grid.x, 32u);
  EXPECT_EQ(p.grid.y, 16u);
  // Ragged edges round up (the kernel masks them): the MLP's 14336 rows, odd M.
  p = plan::plan_fused_sm90(1030, 14336 + 3, 4096);
  EXPECT_EQ(p.row_tiles, 9);
  EXPECT_EQ(p.col_tiles, 113);
  // More X-row tiles than gridDim.y takes: the grid strides.
  p = plan::plan_fused_sm90(plan::kMaxGridY * plan::kFusedSm90TileM + 1, 128, 64);
  EXPECT_EQ(p.row_tiles, plan::kMaxGridY + 1);
  EXPECT_EQ(p.grid.y, static_cast<uint32_t>(plan::kMaxGridY));
  // Empty shapes still give a valid (unlaunched) grid.
  p = plan::plan_fused_sm90(0, 0, 64);
  EXPECT_EQ(p.row_tiles, 0);
  EXPECT_EQ(p.grid.x, 1u);
  EXPECT_EQ(p.grid.y, 1u);
  EXPECT_THROW(plan::plan_fused_sm90(1024, 4096, 96), fourbit::Error);  // K % 64
  EXPECT_THROW(plan::plan_fused_sm90(1024, 4096, 0), fourbit::Error);
  EXPECT_THROW(plan::plan_fused_sm90(-1, 4096, 64), fourbit::Error);
  // The tile the kernel assumes: a warpgroup per 64 W rows, wgmma's N <= 256 and % 8.
  static_assert(plan::kFusedSm90TileN == 64 * plan::kFusedSm90Warpgroups, "a warpgroup per 64 rows");
  static_assert(plan::kFusedSm90TileM % 8 == 0 && plan::kFusedSm90TileM <= 256, "a valid wgmma N");
}

}  // namespace
