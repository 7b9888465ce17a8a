// AdamW steps (32-bit and 8-bit blockwise states, single tensor and multi-tensor tables) on
// the CPU against a scalar reference written here from the documented arithmetic
// (include/fourbit/optim.h, docs/kernels.md), bit for bit; argument validation; and the page
// manager's host buffers and free-memory check.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/optim.h"
#include "fourbit/paging.h"
#include "fourbit/quantize.h"
#include "test_helpers.h"

namespace {

using fourbit::AdamWHyperParams;
using fourbit::AdamWTensor;
using fourbit::DType;
using fourbit::StateBits;
using fourbit_test::normal_data;
using fourbit_test::throws_error;
using fourbit_test::throws_invalid;
using fourbit_test::TypedBuffer;

using Code = std::array<float, fourbit::kDynamicMapSize>;
constexpr int64_t kBlock = fourbit::kAdamW8bitBlocksize;

AdamWHyperParams hyper(double lr = 1e-2, double wd = 0.1) {
  AdamWHyperParams h;
  h.lr = lr;
  h.beta1 = 0.9;
  h.beta2 = 0.999;
  h.eps = 1e-8;
  h.weight_decay = wd;
  return h;
}

// Nearest code by a full scan; ties and duplicates to the lower index; NaN -> 0.
uint8_t reference_index(float s, const Code& code) {
  if (std::isnan(s)) return 0;
  int best = 0;
  float best_dist = std::fabs(s - code[0]);
  for (int k = 1; k < fourbit::kDynamicMapSize; ++k) {
    const float dist = std::fabs(s - code[k]);
    if (dist < best_dist) {
      best = k;
      best_dist = dist;
    }
  }
  return static_cast<uint8_t>(best);
}

// The fp32 coefficients, computed here independently of the library.
struct Coeff {
  float decay, b1, omb1, b2, omb2, eps, nss;
};
Coeff coeff(const AdamWHyperParams& h, int64_t step) {
  const double bc1 = 1.0 - std::pow(h.beta1, double(step));
  const double bc2 = 1.0 - std::pow(h.beta2, double(step));
  return {float(1.0 - h.lr * h.weight_decay), float(h.beta1), float(1.0 - h.beta1), float(h.beta2),
          float(1.0 - h.beta2), float(h.eps * std::sqrt(bc2)),
          float(-(h.lr * std::sqrt(bc2) / bc1))};
}

// Scalar reference of one tensor's step (fp32 math, params rounded to `dtype` on store).
struct RefTensor {
  DType dtype;
  std::vector<float> p, g;       // p holds values representable in dtype
  std::vector<float> m, v;       // 32-bit states
  std::vector<uint8_t> q1, q2;   // 8-bit states
  std::vector<float> a1, a2;
  bool bits8 = false;
};

void reference_step(RefTensor& t, const AdamWHyperParams& h, int64_t step, const Code& map1,
                    const Code& map2) {
  const Coeff c = coeff(h, step);
  const int64_t n = static_cast<int64_t>(t.p.size());
  std::vector<float> m(n), v(n);
  for (int64_t i = 0; i < n; ++i) {
    m[i] = t.bits8 ? map1[t.q1[i]] * t.a1[i / kBlock] : t.m[i];
    v[i] = t.bits8 ? map2[t.q2[i]] * t.a2[i / kBlock] : t.v[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    const float g = t.g[i];
    if (t.bits8) {
      m[i] = m[i] * c.b1 + g * c.omb1;
      v[i] = v[i] * c.b2 + c.omb2 * (g * g);
    } else {
      m[i] = std::fma(c.omb1, g - m[i], m[i]);  // torch's lerp (weight 0.1 < 0.5)
      v[i] = std::fma(c.omb2 * g, g, v[i] * c.b2);
    }
    const float denom = std::sqrt(v[i]) + c.eps;
    const float p = t.p[i] * c.decay + (c.nss * m[i]) / denom;
    t.p[i] = fourbit_test::round_to(t.dtype, p);
  }
  if (!t.bits8) {
    t.m = m;
    t.v = v;
    return;
  }
  for (int64_t b = 0; b * kBlock < n; ++b) {
    const int64_t end = std::min(n, (b + 1) * kBlock);
    float am1 = 0, am2 = 0;
    for (int64_t i = b * kBlock; i < end; ++i) {
      am1 = std::max(am1, std::fabs(m[i]));
      am2 = std::max(am2, std::fabs(v[i]));
    }
    t.a1[b] = am1;
    t.a2[b] = am2;
    for (int64_t i = b * kBlock; i < end; ++i) {
      t.q1[i] = reference_index(m[i] / am1, map1);
      t.q2[i] = reference_index(v[i] / am2, map2);
    }
  }
}

// Library-side buffers of one tensor.
struct LibTensor {
  TypedBuffer p, g;
  std::vector<float> m, v;
  std::vector<uint8_t> q1, q2;
  std::vector<float> a1, a2;
  LibTensor(const RefTensor& r)
      : p(TypedBuffer::from_floats(r.dtype, r.p)), g(TypedBuffer::from_floats(r.dtype, r.g)),
        m(r.m), v(r.v), q1(r.q1), q2(r.q2), a1(r.a1), a2(r.a2) {}
  AdamWTensor entry(const RefTensor& r, int64_t step) {
    AdamWTensor t;
    t.param = p.data();
    t.grad = g.data();
    t.dtype = r.dtype;
    t.bits = r.bits8 ? StateBits::Bits8 : StateBits::Bits32;
    t.state1 = r.bits8 ? static_cast<void*>(q1.data()) : static_cast<void*>(m.data());
    t.state2 = r.bits8 ? static_cast<void*>(q2.data()) : static_cast<void*>(v.data());
    t.absmax1 = r.bits8 ? a1.data() : nullptr;
    t.absmax2 = r.bits8 ? a2.data() : nullptr;
    t.numel = static_cast<int64_t>(r.p.size());
    t.step = step;
    return t;
  }
};

RefTensor make_tensor(DType dtype, int64_t n, bool bits8, uint32_t seed) {
  RefTensor t;
  t.dtype = dtype;
  t.bits8 = bits8;
  t.p = normal_data(n, seed);
  for (auto& x : t.p) x = fourbit_test::round_to(dtype, x);
  t.g.assign(n, 0.0f);
  if (bits8) {
    t.q1.assign(n, 0);
    t.q2.assign(n, 0);
    const int64_t blocks = fourbit::num_blocks(n, kBlock);
    t.a1.assign(blocks, 0.0f);
    t.a2.assign(blocks, 0.0f);
    // Index 127 / 0 are exact zeros of the signed / unsigned maps: zero-initialised states.
    const Code map1 = fourbit::create_dynamic_map(true);
    const Code map2 = fourbit::create_dynamic_map(false);
    t.q1.assign(n, reference_index(0.0f, map1));
    t.q2.assign(n, reference_index(0.0f, map2));
  } else {
    t.m.assign(n, 0.0f);
    t.v.assign(n, 0.0f);
  }
  return t;
}

void new_grads(RefTensor& t, LibTensor& lib, uint32_t seed) {
  t.g = normal_data(static_cast<int64_t>(t.p.size()), seed);
  for (size_t i = 0; i < t.g.size(); ++i) {
    t.g[i] = fourbit_test::round_to(t.dtype, t.g[i] * (i % 7 == 0 ? 100.0f : 0.01f));
  }
  lib.g = TypedBuffer::from_floats(t.dtype, t.g);
}

void expect_same(const RefTensor& r, const LibTensor& l, const std::string& what) {
  for (size_t i = 0; i < r.p.size(); ++i) {
    ASSERT_EQ(fourbit_test::bits_as(r.dtype, r.p[i]), l.p.bits(i)) << what << " param " << i;
  }
  if (r.bits8) {
    ASSERT_EQ(r.q1, l.q1) << what;
    ASSERT_EQ(r.q2, l.q2) << what;
    ASSERT_EQ(r.a1, l.a1) << what;
    ASSERT_EQ(r.a2, l.a2) << what;
  } else {
    for (size_t i = 0; i < r.m.size(); ++i) {
      ASSERT_EQ(fourbit::detail::float_bits(r.m[i]), fourbit::detail::float_bits(l.m[i])) << what << " m " << i;
      ASSERT_EQ(fourbit::detail::float_bits(r.v[i]), fourbit::detail::float_bits(l.v[i])) << what << " v " << i;
    }
  }
}

const Code& signed_map() {
  static const Code c = fourbit::create_dynamic_map(true);
  return c;
}
const Code& unsigned_map() {
  static const Code c = fourbit::create_dynamic_map(false);
  return c;
}

// Sizes with partial blocks and chunks, a single element, and a multi-chunk tensor.
const int64_t kSizes[] = {1, 15, 255, 257, 4096 + 3, 3 * 4096 * 4 + 17};

TEST(AdamW, SingleTensorMatchesReferenceBitForBit) {
  for (bool bits8 : {false, true}) {
    for (DType dtype : fourbit_test::kAllDTypes) {
      for (int64_t n : kSizes) {
        RefTensor ref = make_tensor(dtype, n, bits8, 7 + static_cast<uint32_t>(n));
        LibTensor lib(ref);
        const AdamWHyperParams h = hyper();
        for (int64_t step = 1; step <= 4; ++step) {
          new_grads(ref, lib, static_cast<uint32_t>(100 * step + n));
          reference_step(ref, h, step, signed_map(), unsigned_map());
          if (bits8) {
            fourbit::AdamW8bitParams p;
            p.param = lib.p.data();
            p.grad = lib.g.data();
            p.dtype = dtype;
            p.state1 = lib.q1.data();
            p.state2 = lib.q2.data();
            p.absmax1 = lib.a1.data();
            p.absmax2 = lib.a2.data();
            p.qmap1 = signed_map().data();
            p.qmap2 = unsigned_map().data();
            p.numel = n;
            p.step = step;
            p.hyper = h;
            fourbit::adamw_step_8bit(p);
          } else {
            fourbit::AdamW32bitParams p;
            p.param = lib.p.data();
            p.grad = lib.g.data();
            p.dtype = dtype;
            p.exp_avg = lib.m.data();
            p.exp_avg_sq = lib.v.data();
            p.numel = n;
            p.step = step;
            p.hyper = h;
            fourbit::adamw_step_32bit(p);
          }
          expect_same(ref, lib, std::string(bits8 ? "8bit " : "32bit ") + fourbit::to_string(dtype) +
                                    " n=" + std::to_string(n) + " step=" + std::to_string(step));
        }
      }
    }
  }
}

// Values that probe every decision of the nearest-code search in [-1, 1]: each code, each
// midpoint between neighbours and their fp32 neighbours one and two ulps away, and the
// bucket edges of the AVX-512 search (fp32 values whose low 18 bits are all 0 or all 1).
std::vector<float> search_probes(const Code& code) {
  std::vector<float> v;
  for (int k = 0; k < fourbit::kDynamicMapSize; ++k) {
    v.push_back(code[k]);
    if (k + 1 < fourbit::kDynamicMapSize) {
      float mid = (code[k] + code[k + 1]) / 2;
      for (int u = 0; u < 2; ++u) {
        v.push_back(mid);
        v.push_back(std::nextafter(mid, 2.0f));
        v.push_back(std::nextafter(mid, -2.0f));
        mid = std::nextafter(mid, u == 0 ? 2.0f : -2.0f);
      }
    }
  }
  for (uint32_t hi = 0; hi < (1u << 14); ++hi) {
    for (uint32_t low : {0u, (1u << 18) - 1}) {
      const uint32_t bits = (hi << 18) | low;
      float x;
      std::memcpy(&x, &bits, 4);
      if (std::isfinite(x) && std::fabs(x) <= 1.0f) v.push_back(x);
    }
  }
  return v;
}

TEST(AdamW, EightBitCodesExactAtEverySearchDecision) {
  // beta1 = beta2 = 0 makes the new states exactly m = g and v = g * g, so the probes reach
  // the quantizer unchanged (block absmax pinned to 1 by a leading 1.0 in every block).
  for (bool is_signed : {true, false}) {
    const Code& code = is_signed ? signed_map() : unsigned_map();
    std::vector<float> probes = search_probes(code);
    std::vector<float> g;
    for (size_t i = 0; i < probes.size(); ++i) {
      if (g.size() % kBlock == 0) g.push_back(1.0f);
      // For the unsigned map (state2 = g^2) feed square roots: g*g lands on or next to the probe.
      g.push_back(is_signed ? probes[i] : std::sqrt(std::fabs(probes[i])));
    }
    const int64_t n = static_cast<int64_t>(g.size());
    RefTensor ref = make_tensor(DType::Float32, n, true, 11);
    ref.g = g;
    LibTensor lib(ref);
    lib.g = TypedBuffer::from_floats(DType::Float32, g);
    AdamWHyperParams h = hyper(1e-3, 0.0);
    h.beta1 = 0.0;
    h.beta2 = 0.0;
    reference_step(ref, h, 1, signed_map(), unsigned_map());
    std::vector<AdamWTensor> table{lib.entry(ref, 1)};
    fourbit::AdamWMultiTensorParams p;
    p.tensors = table.data();
    p.num_tensors = 1;
    p.hyper = h;
    p.qmap1 = signed_map().data();
    p.qmap2 = unsigned_map().data();
    fourbit::adamw_step(p);
    expect_same(ref, lib, is_signed ? "signed probes" : "unsigned probes");
  }
}

TEST(AdamW, MultiTensorTableEqualsPerTensorReference) {
  // A mixed group: every dtype, both state kinds, per-tensor step counts, an empty tensor.
  std::vector<RefTensor> refs;
  std::vector<int64_t> steps;
  uint32_t seed = 1;
  for (int64_t n : {int64_t{0}, int64_t{33}, int64_t{4096}, int64_t{70000}, int64_t{300}}) {
    for (DType dtype : fourbit_test::kAllDTypes) {
      refs.push_back(make_tensor(dtype, n, seed % 2 == 0, seed));
      steps.push_back(1 + seed % 3);
      ++seed;
    }
  }
  std::vector<LibTensor> libs(refs.begin(), refs.end());
  const AdamWHyperParams h = hyper(3e-3, 0.0);
  for (int iter = 0; iter < 3; ++iter) {
    std::vector<AdamWTensor> table;
    for (size_t i = 0; i < refs.size(); ++i) {
      new_grads(refs[i], libs[i], static_cast<uint32_t>(1000 * iter + i));
      reference_step(refs[i], h, steps[i] + iter, signed_map(), unsigned_map());
      table.push_back(libs[i].entry(refs[i], steps[i] + iter));
    }
    fourbit::AdamWMultiTensorParams p;
    p.tensors = table.data();
    p.num_tensors = static_cast<int64_t>(table.size());
    p.hyper = h;
    p.qmap1 = signed_map().data();
    p.qmap2 = unsigned_map().data();
    fourbit::adamw_step(p);
    for (size_t i = 0; i < refs.size(); ++i) expect_same(refs[i], libs[i], "table entry " + std::to_string(i));
  }
}

TEST(AdamW, FirstStepFromZeroStateMatchesClosedForm) {
  // Step 1 from zero moments: m = (1-b1) g, v = (1-b2) g^2, so the update is about
  // -lr * sign(g) (Adam's first step), independently of the reference above.
  RefTensor ref = make_tensor(DType::Float32, 1000, false, 3);
  LibTensor lib(ref);
  new_grads(ref, lib, 5);
  const std::vector<float> p0 = ref.p;
  fourbit::AdamW32bitParams p;
  p.param = lib.p.data();
  p.grad = lib.g.data();
  p.exp_avg = lib.m.data();
  p.exp_avg_sq = lib.v.data();
  p.numel = 1000;
  p.hyper = hyper(1e-3, 0.0);
  fourbit::adamw_step_32bit(p);
  for (int i = 0; i < 1000; ++i) {
    const float g = ref.g[i];
    const float expected = g == 0.0f ? p0[i] : p0[i] - 1e-3f * (g > 0 ? 1.0f : -1.0f);
    EXPECT_NEAR(lib.p.value(i), expected, 2e-6f) << i;
  }
}

fourbit::AdamW32bitParams valid_32bit(std::vector<float>& buf) {
  buf.assign(8, 0.0f);
  fourbit::AdamW32bitParams p;
  p.param = buf.data();
  p.grad = buf.data() + 2;
  p.exp_avg = buf.data() + 4;
  p.exp_avg_sq = buf.data() + 6;
  p.numel = 2;
  return p;
}

TEST(AdamW, RejectsBadHyperParameters) {
  std::vector<float> buf;
  struct Case {
    const char* needle;
    const char* value;
    void (*set)(AdamWHyperParams&);
  };
  const Case cases[] = {
      {"lr must be >= 0", "-0.001", [](AdamWHyperParams& h) { h.lr = -1e-3; }},
      {"lr must be finite", "nan", [](AdamWHyperParams& h) { h.lr = std::nan(""); }},
      {"beta1 must be in [0, 1)", "1", [](AdamWHyperParams& h) { h.beta1 = 1.0; }},
      {"beta1 must be in [0, 1)", "-0.5", [](AdamWHyperParams& h) { h.beta1 = -0.5; }},
      {"beta2 must be in [0, 1)", "1.5", [](AdamWHyperParams& h) { h.beta2 = 1.5; }},
      {"eps must be > 0", "0", [](AdamWHyperParams& h) { h.eps = 0.0; }},
      {"eps must be > 0", "-1e-08", [](AdamWHyperParams& h) { h.eps = -1e-8; }},
      {"weight_decay must be >= 0", "-0.1", [](AdamWHyperParams& h) { h.weight_decay = -0.1; }},
  };
  for (const Case& c : cases) {
    fourbit::AdamW32bitParams p = valid_32bit(buf);
    c.set(p.hyper);
    EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_32bit(p); }, {c.needle, c.value})) << c.needle;
  }
}

TEST(AdamW, RejectsBadTables) {
  std::vector<float> buf;
  fourbit::AdamW32bitParams p = valid_32bit(buf);
  p.step = 0;
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_32bit(p); }, {"tensors[0].step must be >= 1", "0"}));
  p = valid_32bit(buf);
  p.exp_avg_sq = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_32bit(p); }, {"tensors[0].state2 is null", "2"}));
  p = valid_32bit(buf);
  p.numel = -4;
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_32bit(p); }, {"tensors[0].numel must be >= 0", "-4"}));
  p = valid_32bit(buf);
  p.dtype = static_cast<DType>(9);
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_32bit(p); }, {"tensors[0].dtype", "9"}));

  std::vector<uint8_t> q(4);
  std::vector<float> f(8);
  fourbit::AdamW8bitParams q8;
  q8.param = f.data();
  q8.grad = f.data() + 2;
  q8.state1 = q.data();
  q8.state2 = q.data() + 2;
  q8.absmax1 = f.data() + 4;
  q8.absmax2 = f.data() + 5;
  q8.numel = 2;
  q8.qmap2 = unsigned_map().data();
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_8bit(q8); }, {"qmap1 is null"}));
  q8.qmap1 = signed_map().data();
  q8.absmax2 = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_8bit(q8); }, {"tensors[0].absmax2 is null"}));

  AdamWTensor t;
  t.bits = static_cast<StateBits>(16);
  fourbit::AdamWMultiTensorParams mp;
  mp.tensors = &t;
  mp.num_tensors = 1;
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step(mp); }, {"tensors[0].bits must be 32 or 8", "16"}));
  mp.tensors = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step(mp); }, {"tensors is null", "1"}));
}

TEST(AdamW, CudaEntryPointsFailClearlyWithoutCuda) {
  if (fourbit::built_with_cuda()) GTEST_SKIP() << "built with CUDA: the GPU path is tested from Python";
  std::vector<float> buf;
  fourbit::AdamW32bitParams p = valid_32bit(buf);
  EXPECT_TRUE(throws_error([&] { fourbit::adamw_step_32bit_cuda(p, nullptr); },
                           fourbit::Error::Kind::Runtime, {"adamw_step_32bit_cuda", "without CUDA"}));
}

TEST(Paging, HostBuffersAreZeroedTrackedAndReleased) {
  auto& pm = fourbit::PageManager::instance();
  const int64_t before = pm.num_buffers();
  const int64_t bytes_before = pm.bytes_allocated();
  void* ptr = pm.allocate(100000, fourbit::kHostDevice);
  ASSERT_NE(ptr, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ptr) % 4096, 0u);
  const auto* bytes = static_cast<const uint8_t*>(ptr);
  EXPECT_TRUE(std::all_of(bytes, bytes + 100000, [](uint8_t b) { return b == 0; }));
  EXPECT_TRUE(pm.owns(ptr));
  EXPECT_EQ(pm.num_buffers(), before + 1);
  EXPECT_EQ(pm.bytes_allocated(), bytes_before + 100000);
  pm.prefetch(ptr, 100000, 0, nullptr);  // host buffers never move: a no-op
  EXPECT_TRUE(throws_invalid([&] { pm.prefetch(ptr, 100001, 0, nullptr); }, {"bytes = 100001"}));
  pm.release(ptr);
  EXPECT_FALSE(pm.owns(ptr));
  EXPECT_EQ(pm.num_buffers(), before);
  int x = 0;
  EXPECT_TRUE(throws_invalid([&] { pm.release(&x); }, {"was not allocated by the page manager"}));
}

TEST(Paging, RefusesMoreThanFreeMemory) {
  fourbit::MemoryInfo info;
  info.free_bytes = int64_t{1} << 30;
  info.total_bytes = int64_t{2} << 30;
  fourbit::check_paged_request((int64_t{1} << 30) - fourbit::kPagedHeadroomBytes, info, 0);
  EXPECT_TRUE(throws_error(
      [&] { fourbit::check_paged_request((int64_t{1} << 30) - fourbit::kPagedHeadroomBytes + 1, info, 0); },
      fourbit::Error::Kind::Runtime, {"bytes = 805306369", "cuda:0", "1073741824 bytes free"}));
  EXPECT_TRUE(throws_invalid([&] { fourbit::check_paged_request(-1, info, 0); }, {"bytes must be >= 0", "-1"}));
  // The real host: a petabyte does not fit.
  const int64_t petabyte = int64_t{1} << 50;
  EXPECT_TRUE(throws_error([&] { fourbit::PageManager::instance().allocate(petabyte, fourbit::kHostDevice); },
                           fourbit::Error::Kind::Runtime, {"bytes = 1125899906842624", "the host"}));
  EXPECT_GT(fourbit::memory_info(fourbit::kHostDevice).free_bytes, 0);
}

TEST(Paging, DeviceBuffersNeedCuda) {
  if (fourbit::built_with_cuda()) GTEST_SKIP() << "built with CUDA: device buffers are tested from Python";
  EXPECT_TRUE(throws_error([&] { fourbit::PageManager::instance().allocate(4096, 0); },
                           fourbit::Error::Kind::Runtime, {"without CUDA"}));
}

}  // namespace

namespace {

// An fp32 single-tensor 8-bit step over the given buffers, with bitsandbytes' maps.
fourbit::AdamW8bitParams eight_bit_params(float* param, const float* grad, uint8_t* s1, uint8_t* s2, float* a1,
                                          float* a2, int64_t numel) {
  fourbit::AdamW8bitParams p;
  p.param = param;
  p.grad = grad;
  p.state1 = s1;
  p.state2 = s2;
  p.absmax1 = a1;
  p.absmax2 = a2;
  p.qmap1 = signed_map().data();
  p.qmap2 = unsigned_map().data();
  p.numel = numel;
  return p;
}

}  // namespace

// The 8-bit maps must be sorted: the nearest-code search relies on it. A descending map (or
// one with a NaN) is an argument error before anything is written.
TEST(AdamW, RejectsUnsortedMaps) {
  std::vector<uint8_t> codes(512, 7);
  std::vector<float> param(256, 1.0f), grad(256, 0.5f), absmax(4, 1.0f);
  Code descending = signed_map();
  std::reverse(descending.begin(), descending.end());
  Code with_nan = unsigned_map();
  with_nan[100] = std::nanf("");
  using Case = std::tuple<const Code*, const Code*, std::string>;
  for (const auto& [bad1, bad2, name] : {Case{&descending, &unsigned_map(), "qmap1"},
                                        Case{&signed_map(), &with_nan, "qmap2"}}) {
    fourbit::AdamW8bitParams p = eight_bit_params(param.data(), grad.data(), codes.data(), codes.data() + 256,
                                                  absmax.data(), absmax.data() + 1, 256);
    p.qmap1 = bad1->data();
    p.qmap2 = bad2->data();
    EXPECT_TRUE(throws_invalid([&] { fourbit::adamw_step_8bit(p); },
                               {name + " must be sorted ascending"}));
    EXPECT_EQ(param, std::vector<float>(256, 1.0f));
    EXPECT_EQ(codes, std::vector<uint8_t>(512, 7));
  }
}

// A non-finite gradient element stays confined to its own parameter with 8-bit states, as
// with torch.optim.AdamW: each block's absmax is taken over its finite moments only.
TEST(AdamW, EightBitNonFiniteGradientStaysInItsElement) {
  for (float bad : {INFINITY, -INFINITY, std::nanf("")}) {
    const int64_t n = 512;
    std::vector<float> param = normal_data(n, 5), grad(n);
    std::vector<uint8_t> s1(n), s2(n);
    std::vector<float> a1(2), a2(2);
    fourbit::AdamW8bitParams p = eight_bit_params(param.data(), grad.data(), s1.data(), s2.data(), a1.data(),
                                                  a2.data(), n);
    for (int step = 1; step <= 3; ++step) {
      const std::vector<float> fresh = normal_data(n, 10 + step);
      std::copy(fresh.begin(), fresh.end(), grad.begin());  // p.grad keeps pointing at grad
      if (step == 1) grad[5] = bad;
      p.step = step;
      fourbit::adamw_step_8bit(p);
    }
    EXPECT_FALSE(std::isfinite(param[5])) << bad;
    for (int64_t i = 0; i < n; ++i) {
      if (i != 5) ASSERT_TRUE(std::isfinite(param[i])) << "bad " << bad << " spread to " << i;
    }
    for (float a : {a1[0], a1[1], a2[0], a2[1]}) EXPECT_TRUE(std::isfinite(a)) << bad;
  }
}
