// Inline-PTX wrappers for Hopper's warpgroup MMA (sm_90a only): wgmma.mma_async with A from
// registers and B from shared memory through a matrix descriptor (include/fourbit/detail/
// wgmma_smem.h), and the fence / commit / wait that order it. The fragment maps are
// mma::wgmma_a_reg / mma::wgmma_acc (include/fourbit/detail/mma_layout.h). Every body is
// compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL): other targets see empty functions
// that the kernels, whose own bodies are guarded the same way, never call. Internal header.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FOURBIT_SM90A_DEVICE 1
#endif

namespace fourbit {
namespace cuda {

// Orders this thread's earlier register writes (A fragments, accumulators) before the
// warpgroup's next wgmma.mma_async reads them.
__device__ __forceinline__ void wgmma_fence() {
#ifdef FOURBIT_SM90A_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of wgmma.mma_async issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#ifdef FOURBIT_SM90A_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most kPending committed groups are still running (0: all done; their
// accumulators readable, their A registers and shared memory free).
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FOURBIT_SM90A_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Makes this thread's generic-proxy writes to shared memory (cp.async's, once waited for)
// visible to the async proxy that wgmma reads B through.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef FOURBIT_SM90A_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving accesses to `x` across an asynchronous wgmma's window.
__device__ __forceinline__ void wgmma_fence_operand(float& x) {
#ifdef FOURBIT_SM90A_DEVICE
  asm volatile("" : "+f"(x)::"memory");
#endif
}

// d (64 x 128 fp32, 64 registers per thread in mma::wgmma_acc order) += A (64 x 16, 4 registers
// of packed b16 pairs per thread in mma::wgmma_a_reg order) * B (16 x 128, K-major in shared
// memory at descriptor `desc`, not transposed). scale-d = true (accumulate: the caller zeroes d), A and B not negated.
// S = __half or __nv_bfloat16.
//
// One asm statement for both element types: TYPE is the PTX type string ("f16" or "bf16").
#define FOURBIT_WGMMA_M64N128K16_RS(TYPE)                                                                 \
  asm volatile(                                                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                       \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                     \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                             \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                    \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                    \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                   \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                       \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),     \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),             \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),           \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),           \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),           \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),           \
        "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),           \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),           \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])            \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

template <typename S>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
#ifdef FOURBIT_SM90A_DEVICE
  if constexpr (std::is_same<S, __half>::value) {
    FOURBIT_WGMMA_M64N128K16_RS("f16");
  } else {
    FOURBIT_WGMMA_M64N128K16_RS("bf16");
  }
#else
  (void)d;
  (void)a;
  (void)desc;
#endif
}

#undef FOURBIT_WGMMA_M64N128K16_RS

}  // namespace cuda
}  // namespace fourbit
