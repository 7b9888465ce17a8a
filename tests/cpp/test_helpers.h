// Helpers shared by the GoogleTest suites: typed host buffers (fp32 / fp16 / bf16),
// deterministic test data and a checker for fourbit::Error. Test-only header.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "fourbit/detail/element_math.h"
#include "fourbit/error.h"
#include "fourbit/types.h"

namespace fourbit_test {

// A never-dereferenced pointer for validate()-only tests of huge sizes: slot i lies 2^44
// bytes past slot i - 1, so the ranges of distinct slots never overlap.
template <typename T>
T* far_pointer(int slot) {
  return reinterpret_cast<T*>(uintptr_t{static_cast<uintptr_t>(slot)} << 44);
}


using fourbit::DType;

constexpr DType kAllDTypes[] = {DType::Float32, DType::Float16, DType::BFloat16};

// Rounds v to `dtype` and back: the value a kernel reads from an input of that dtype.
inline float round_to(DType dtype, float v) {
  switch (dtype) {
    case DType::Float16: return fourbit::detail::half_to_float(fourbit::detail::float_to_half(v));
    case DType::BFloat16: return fourbit::detail::bf16_to_float(fourbit::detail::float_to_bf16(v));
    case DType::Float32: break;
  }
  return v;
}

// The unit roundoff of `dtype` (half an ulp of 1): the relative error of one rounding.
inline double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::Float16: return std::ldexp(1.0, -11);
    case DType::BFloat16: return std::ldexp(1.0, -8);
    case DType::Float32: break;
  }
  return std::ldexp(1.0, -24);
}

// Raw bits of v stored as `dtype` (fp32 bits, or the 16 bits of fp16 / bf16).
inline uint32_t bits_as(DType dtype, float v) {
  switch (dtype) {
    case DType::Float16: return fourbit::detail::float_to_half(v);
    case DType::BFloat16: return fourbit::detail::float_to_bf16(v);
    case DType::Float32: break;
  }
  return fourbit::detail::float_bits(v);
}

// A host buffer of `numel` elements of `dtype`, holding raw bytes as a kernel sees them.
class TypedBuffer {
 public:
  TypedBuffer(DType dtype, int64_t numel)
      : dtype_(dtype), bytes_(static_cast<size_t>(numel * fourbit::element_size(dtype))) {}

  // The buffer holding `values` rounded to `dtype`.
  static TypedBuffer from_floats(DType dtype, const std::vector<float>& values) {
    TypedBuffer buf(dtype, static_cast<int64_t>(values.size()));
    for (size_t i = 0; i < values.size(); ++i) buf.set_bits(i, bits_as(dtype, values[i]));
    return buf;
  }

  DType dtype() const { return dtype_; }
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }

  uint32_t bits(size_t i) const {
    if (dtype_ == DType::Float32) {
      uint32_t u;
      std::memcpy(&u, bytes_.data() + 4 * i, 4);
      return u;
    }
    uint16_t h;
    std::memcpy(&h, bytes_.data() + 2 * i, 2);
    return h;
  }

  float value(size_t i) const {
    const uint32_t u = bits(i);
    switch (dtype_) {
      case DType::Float16: return fourbit::detail::half_to_float(static_cast<uint16_t>(u));
      case DType::BFloat16: return fourbit::detail::bf16_to_float(static_cast<uint16_t>(u));
      case DType::Float32: break;
    }
    return fourbit::detail::bits_float(u);
  }

 private:
  void set_bits(size_t i, uint32_t u) {
    if (dtype_ == DType::Float32) {
      std::memcpy(bytes_.data() + 4 * i, &u, 4);
    } else {
      const uint16_t h = static_cast<uint16_t>(u);
      std::memcpy(bytes_.data() + 2 * i, &h, 2);
    }
  }

  DType dtype_;
  std::vector<uint8_t> bytes_;
};

// Deterministic N(0, 1) data with some structure: exact zeros, blocks at very different
// scales and an occasional large outlier, so absmax and the small codes both get exercised.
inline std::vector<float> test_data(int64_t numel, uint32_t seed = 1234) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) {
    const float scale = (i / 500) % 3 == 0 ? 1.0f : ((i / 500) % 3 == 1 ? 1e-3f : 50.0f);
    x[i] = normal(rng) * scale;
    if (i % 97 == 13) x[i] = 0.0f;
    if (i % 1009 == 500) x[i] *= 100.0f;
  }
  return x;
}

// Plain N(0, 1) data.
inline std::vector<float> normal_data(int64_t numel, uint32_t seed = 42) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(numel));
  for (auto& v : x) v = normal(rng);
  return x;
}

// One fp32 multiply, rounded on its own (volatile keeps it from fusing into an FMA).
inline float mul_f32(float a, float b) {
  volatile float r = a * b;
  return r;
}

// Success when fn() throws a fourbit::Error of `kind` whose message contains every needle.
template <typename Fn>
::testing::AssertionResult throws_error(Fn&& fn, fourbit::Error::Kind kind,
                                        const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const fourbit::Error& e) {
    const std::string msg = e.what();
    if (e.kind() != kind) {
      return ::testing::AssertionFailure() << "wrong Error kind; message: " << msg;
    }
    for (const auto& needle : needles) {
      if (msg.find(needle) == std::string::npos) {
        return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << needle
                                             << "\"";
      }
    }
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no fourbit::Error was thrown";
}

inline ::testing::AssertionResult throws_invalid(std::function<void()> fn,
                                                 const std::vector<std::string>& needles) {
  return throws_error(fn, fourbit::Error::Kind::InvalidArgument, needles);
}

}  // namespace fourbit_test
