// FOURBIT_HD marks a function compiled for the host and (under nvcc) the device, inlined;
// FOURBIT_UNROLL asks nvcc to unroll the next loop. Internal header.
#pragma once

#if defined(__CUDACC__)
#define FOURBIT_HD __host__ __device__ __forceinline__
#define FOURBIT_UNROLL _Pragma("unroll")
#else
#define FOURBIT_HD inline
#define FOURBIT_UNROLL
#endif
