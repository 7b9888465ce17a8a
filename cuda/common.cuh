// Shared device helpers for fourbit's CUDA kernels: launch checking, typed element
// load/store (fp32 / fp16 / bf16, converted by the shared element math so the GPU stores
// the CPU's bytes, NaN included) and dtype dispatch. Internal header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fourbit/detail/element_math.h"
#include "fourbit/detail/launch_plan.h"
#include "fourbit/error.h"
#include "fourbit/types.h"

// Throws a fourbit::Error (Runtime) if a CUDA runtime call failed.
#define FOURBIT_CUDA_CHECK(expr)                                                          \
  do {                                                                                    \
    const cudaError_t fourbit_err_ = (expr);                                              \
    FOURBIT_CHECK_RUNTIME(fourbit_err_ == cudaSuccess, "CUDA error in ", #expr, ": ",     \
                          cudaGetErrorString(fourbit_err_), " (", __FILE__, ":",          \
                          __LINE__, ")");                                                 \
  } while (0)

// Checks the most recent kernel launch.
#define FOURBIT_CUDA_LAUNCH_CHECK() FOURBIT_CUDA_CHECK(cudaGetLastError())

namespace fourbit {
namespace cuda {

// Threads per CTA for the elementwise kernels (launch_plan.h gives the reason).
constexpr int kThreadsPerBlock = plan::kElementwiseThreads;

// The CTA budget of a grid-stride launch on the current device (plan::max_resident_ctas).
int max_grid_blocks();

// Compute capability of the current device as major * 10 + minor (90 for H100), cached.
int compute_capability();

__device__ __forceinline__ float to_float(float x) { return x; }
// fp16 widening is exact: the hardware conversion gives detail::half_to_float's value for
// every non-NaN input in one instruction (the software form costs ~10 per element, which the
// gemv would pay per weight element), and a NaN stays a NaN until a store canonicalises it.
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return detail::bf16_to_float(__bfloat16_as_ushort(x));
}

// Rounds to nearest even with the canonical NaN of detail::float_to_half / float_to_bf16
// (the hardware conversions would store 0x7FFF for every NaN).
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __ushort_as_half(detail::float_to_half(x));
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __ushort_as_bfloat16(detail::float_to_bf16(x));
}

// Calls fn(T{}) with T the device storage type of `dtype`.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16: fn(__half{}); return;
    case DType::BFloat16: fn(__nv_bfloat16{}); return;
    case DType::Float32: fn(float{}); return;
  }
}

// Grid size for `work_items` independent items at `per_cta` items per CTA.
inline unsigned int grid_for(int64_t work_items, int64_t per_cta) {
  return plan::grid_stride_ctas(work_items, per_cta, max_grid_blocks());
}

}  // namespace cuda
}  // namespace fourbit
