// Shared helpers of the GoogleTest suites of the C++ torch API (test_torch_*.cpp): the
// fixtures Python wrote (tests/fixtures/make_cpp_torch_fixtures.py) and tensor comparison.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "fourbit/torch/safetensors.h"

namespace fourbit_test {

inline std::string fixture_path(const std::string& name) { return std::string(FOURBIT_FIXTURES_DIR) + "/" + name; }

inline fourbit::io::TensorMap load_fixture(const std::string& name) {
  return fourbit::io::load_safetensors(fixture_path("cpp_torch/" + name));
}

inline const torch::Tensor& entry(const fourbit::io::TensorMap& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) throw std::runtime_error("fixture lacks '" + key + "'");
  return it->second;
}

// Largest |a - b| (as float64); both must have the same shape and dtype.
inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  EXPECT_EQ(a.scalar_type(), b.scalar_type());
  if (a.numel() == 0) return 0.0;
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// Runs `fn`, expecting a c10::ValueError whose message contains every one of `parts`.
template <typename Fn>
void expect_value_error(Fn&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected a c10::ValueError";
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

}  // namespace fourbit_test
