// Typed load/store of fp32 / fp16 / bf16 elements for the CPU kernels, plus the dtype
// dispatch that instantiates a kernel once per element type. Internal header.
#pragma once

#include <cstdint>

#include "fourbit/detail/element_math.h"
#include "fourbit/types.h"

namespace fourbit {
namespace detail {

// Storage types: fp16 and bf16 travel as their raw 16 bits.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(Half x) { return half_to_float(x.bits); }
inline float to_float(BFloat16 x) { return bf16_to_float(x.bits); }

template <typename T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline Half from_float<Half>(float x) { return Half{float_to_half(x)}; }
template <> inline BFloat16 from_float<BFloat16>(float x) { return BFloat16{float_to_bf16(x)}; }

// Calls fn(T{}) with T the storage type of `dtype`.
template <typename Fn>
decltype(auto) dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16: return fn(Half{});
    case DType::BFloat16: return fn(BFloat16{});
    case DType::Float32: break;
  }
  return fn(float{});
}

}  // namespace detail
}  // namespace fourbit
