// libFuzzer target over the core's validation and parsing entry points (issue 17).
//
// Each input picks one entry point and builds its params from the fuzz bytes: sizes (small
// ones, and hostile ones near INT64_MAX), blocksizes, raw enum values, and pointers that are
// null, exactly as large as the contract asks, or overlapping another buffer. Small calls
// run the real CPU entry point (which validates first) on buffers of exactly the contract's
// sizes, so AddressSanitizer sees any read or write out of bounds; calls too large to
// allocate run validate() only, on never-dereferenced pointers. The only exception allowed
// out of the core is fourbit::Error; anything else (or a crash, or a sanitizer report) is a
// finding. Build: -DFOURBIT_BUILD_FUZZERS=ON with clang (scripts/run_tests.sh, docs/errors.md).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/gemm.h"
#include "fourbit/optim.h"
#include "fourbit/quantize.h"
#include "fourbit/types.h"

namespace {

// Elements a call may allocate and run; larger ones are validated only.
constexpr int64_t kMaxRunElements = 1 << 14;

// A size: mostly small, sometimes hostile.
int64_t fuzz_size(FuzzedDataProvider& in, int64_t small_max) {
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: return in.ConsumeIntegral<int64_t>();
    case 1: return INT64_MAX - in.ConsumeIntegralInRange<int64_t>(0, 8192);
    case 2: return (int64_t{1} << in.ConsumeIntegralInRange<int>(20, 62)) + in.ConsumeIntegralInRange<int>(-2, 2);
    default: return in.ConsumeIntegralInRange<int64_t>(0, small_max);
  }
}

int64_t fuzz_blocksize(FuzzedDataProvider& in) {
  if (in.ConsumeBool()) return int64_t{32} << in.ConsumeIntegralInRange<int>(0, 7);
  return in.ConsumeIntegral<int64_t>();
}

// Owns the buffers of one call. ptr() hands out: null, a buffer of exactly `bytes` (filled
// from the input), or the previous buffer again (aliasing) when that one is large enough.
struct Buffers {
  std::vector<std::vector<uint8_t>> owned;
  FuzzedDataProvider& in;
  bool run;  // false: sizes too large, hand out far pointers for validate() only

  void* ptr(int64_t bytes) {
    const int pick = in.ConsumeIntegralInRange<int>(0, 15);
    if (pick == 0) return nullptr;
    if (!run) return reinterpret_cast<void*>((uintptr_t{owned.size() + 1}) << 44);
    // Aliasing: the previous buffer, when it is large enough to be this argument's too.
    if (pick == 1 && !owned.empty() && !owned.back().empty() &&
        static_cast<int64_t>(owned.back().size()) >= bytes) {
      return owned.back().data();
    }
    owned.emplace_back(static_cast<size_t>(bytes > 0 ? bytes : 0));
    std::vector<uint8_t>& b = owned.back();
    const std::vector<uint8_t> fill = in.ConsumeBytes<uint8_t>(b.size());
    if (!fill.empty()) std::memcpy(b.data(), fill.data(), fill.size());
    return b.data();
  }
};

bool small(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s < 0 || s > kMaxRunElements) return false;
  }
  return true;
}

template <typename Fn>
void guarded(Fn&& fn) {
  try {
    fn();
  } catch (const fourbit::Error&) {
    // A clear argument or runtime error: the expected way to refuse.
  }
}

void fuzz_quantize_4bit(FuzzedDataProvider& in) {
  fourbit::Quantize4bitParams p;
  p.numel = fuzz_size(in, 5000);
  p.blocksize = fuzz_blocksize(in);
  p.dtype = static_cast<fourbit::DType>(in.ConsumeIntegralInRange<int>(-1, 3));
  p.quant_type = static_cast<fourbit::QuantType>(in.ConsumeIntegralInRange<int>(-1, 2));
  Buffers b{{}, in, small({p.numel}) && p.blocksize > 0};
  const int64_t n = b.run ? p.numel : 0;
  p.input = b.ptr(n * 4);
  p.packed = static_cast<uint8_t*>(b.ptr((n + 1) / 2));
  p.absmax = static_cast<float*>(b.ptr(b.run ? fourbit::num_blocks(n, p.blocksize) * 4 : 0));
  guarded([&] { b.run ? fourbit::quantize_4bit(p) : fourbit::validate(p); });
}

void fuzz_dequantize_4bit(FuzzedDataProvider& in) {
  fourbit::Dequantize4bitParams p;
  p.numel = fuzz_size(in, 5000);
  p.blocksize = fuzz_blocksize(in);
  p.out_dtype = static_cast<fourbit::DType>(in.ConsumeIntegralInRange<int>(-1, 3));
  p.quant_type = static_cast<fourbit::QuantType>(in.ConsumeIntegralInRange<int>(-1, 2));
  const bool nested = in.ConsumeBool();
  p.scales.nested_blocksize = in.ConsumeBool() ? 256 : fuzz_blocksize(in);
  Buffers b{{}, in, small({p.numel}) && p.blocksize > 0 && p.scales.nested_blocksize > 0};
  const int64_t n = b.run ? p.numel : 0;
  const int64_t blocks = b.run ? fourbit::num_blocks(n, p.blocksize) : 0;
  p.packed = static_cast<const uint8_t*>(b.ptr((n + 1) / 2));
  if (nested) {
    p.scales.absmax_q = static_cast<const uint8_t*>(b.ptr(blocks));
    p.scales.nested_code = static_cast<const float*>(b.ptr(fourbit::kDynamicMapSize * 4));
    p.scales.nested_absmax = static_cast<const float*>(
        b.ptr(b.run ? fourbit::num_blocks(blocks, p.scales.nested_blocksize) * 4 : 0));
    p.scales.offset = static_cast<const float*>(b.ptr(4));
    if (in.ConsumeBool()) p.scales.absmax = static_cast<const float*>(b.ptr(blocks * 4));
  } else {
    p.scales.absmax = static_cast<const float*>(b.ptr(blocks * 4));
  }
  p.out = b.ptr(n * 4);
  guarded([&] { b.run ? fourbit::dequantize_4bit(p) : fourbit::validate(p); });
}

void fuzz_blockwise(FuzzedDataProvider& in) {
  const int64_t numel = fuzz_size(in, 5000), blocksize = fuzz_blocksize(in);
  Buffers b{{}, in, small({numel}) && blocksize > 0};
  const int64_t n = b.run ? numel : 0;
  const int64_t blocks = b.run ? fourbit::num_blocks(n, blocksize) : 0;
  if (in.ConsumeBool()) {
    fourbit::QuantizeBlockwiseParams p;
    p.numel = numel;
    p.blocksize = blocksize;
    p.dtype = static_cast<fourbit::DType>(in.ConsumeIntegralInRange<int>(-1, 3));
    p.input = b.ptr(n * 4);
    p.code = static_cast<const float*>(b.ptr(fourbit::kDynamicMapSize * 4));  // maybe unsorted
    p.out = static_cast<uint8_t*>(b.ptr(n));
    p.absmax = static_cast<float*>(b.ptr(blocks * 4));
    guarded([&] { b.run ? fourbit::quantize_blockwise(p) : fourbit::validate(p); });
  } else {
    fourbit::DequantizeBlockwiseParams p;
    p.numel = numel;
    p.blocksize = blocksize;
    p.out_dtype = static_cast<fourbit::DType>(in.ConsumeIntegralInRange<int>(-1, 3));
    p.input = static_cast<const uint8_t*>(b.ptr(n));
    p.code = static_cast<const float*>(b.ptr(fourbit::kDynamicMapSize * 4));
    p.absmax = static_cast<const float*>(b.ptr(blocks * 4));
    p.out = b.ptr(n * 4);
    guarded([&] { b.run ? fourbit::dequantize_blockwise(p) : fourbit::validate(p); });
  }
}

void fuzz_gemm(FuzzedDataProvider& in) {
  fourbit::Weight4bit w;
  w.N = fuzz_size(in, 40);
  w.K = fuzz_size(in, 300);
  w.blocksize = fuzz_blocksize(in);
  w.quant_type = static_cast<fourbit::QuantType>(in.ConsumeIntegralInRange<int>(-1, 2));
  const int64_t M = fuzz_size(in, 40);
  const auto dtype = static_cast<fourbit::DType>(in.ConsumeIntegralInRange<int>(-1, 3));
  Buffers b{{}, in, small({w.N, w.K, M}) && w.N * w.K <= kMaxRunElements && M * w.K <= kMaxRunElements &&
                        M * w.N <= kMaxRunElements && w.blocksize > 0};
  const int64_t numel = b.run ? w.N * w.K : 0;
  const int64_t blocks = b.run ? fourbit::num_blocks(numel, w.blocksize) : 0;
  w.packed = static_cast<const uint8_t*>(b.ptr((numel + 1) / 2));
  w.scales.absmax = static_cast<const float*>(b.ptr(blocks * 4));
  const int64_t Mr = b.run ? M : 0;
  if (in.ConsumeBool()) {
    fourbit::Gemm4bitParams p;
    p.weight = w;
    p.M = M;
    p.dtype = dtype;
    p.x = b.ptr(Mr * w.K * 4);
    if (in.ConsumeBool()) p.bias = b.ptr(b.run ? w.N * 4 : 0);
    p.y = b.ptr(Mr * w.N * 4);
    guarded([&] { b.run ? fourbit::gemm_4bit(p) : fourbit::validate(p); });
  } else {
    fourbit::Gemm4bitGradInputParams p;
    p.weight = w;
    p.M = M;
    p.dtype = dtype;
    p.grad_output = b.ptr(Mr * w.N * 4);
    p.grad_input = b.ptr(Mr * w.K * 4);
    guarded([&] { b.run ? fourbit::gemm_4bit_grad_input(p) : fourbit::validate(p); });
  }
}

void fuzz_adamw(FuzzedDataProvider& in) {
  const int n = in.ConsumeIntegralInRange<int>(0, 4);
  std::vector<fourbit::AdamWTensor> tensors(static_cast<size_t>(n));
  int64_t total = 0;
  for (auto& t : tensors) {
    t.numel = fuzz_size(in, 2000);
    total += t.numel > 0 && t.numel <= kMaxRunElements ? t.numel : kMaxRunElements + 1;
  }
  Buffers b{{}, in, total <= kMaxRunElements};
  for (auto& t : tensors) {
    const int64_t numel = b.run ? t.numel : 0;
    t.dtype = static_cast<fourbit::DType>(in.ConsumeIntegralInRange<int>(-1, 3));
    t.bits = in.ConsumeBool() ? fourbit::StateBits::Bits8
                              : static_cast<fourbit::StateBits>(in.ConsumeBool() ? 32 : in.ConsumeIntegral<int>());
    t.step = in.ConsumeBool() ? in.ConsumeIntegralInRange<int64_t>(1, 100) : in.ConsumeIntegral<int64_t>();
    const int64_t state_bytes = t.bits == fourbit::StateBits::Bits8 ? numel : numel * 4;
    t.param = b.ptr(numel * 4);
    t.grad = b.ptr(numel * 4);
    t.state1 = b.ptr(state_bytes);
    t.state2 = b.ptr(state_bytes);
    t.absmax1 = static_cast<float*>(b.ptr(fourbit::num_blocks(numel, fourbit::kAdamW8bitBlocksize) * 4));
    t.absmax2 = static_cast<float*>(b.ptr(fourbit::num_blocks(numel, fourbit::kAdamW8bitBlocksize) * 4));
  }
  fourbit::AdamWMultiTensorParams p;
  p.tensors = tensors.data();
  p.num_tensors = n;
  p.hyper.lr = in.ConsumeFloatingPoint<double>();
  p.hyper.eps = in.ConsumeBool() ? 1e-8 : in.ConsumeFloatingPoint<double>();
  p.hyper.beta1 = in.ConsumeBool() ? 0.9 : in.ConsumeFloatingPoint<double>();
  // Maps: the real ones, or 256 fuzzed floats (unsorted, NaN: must be refused).
  const auto map1 = fourbit::create_dynamic_map(true), map2 = fourbit::create_dynamic_map(false);
  p.qmap1 = in.ConsumeBool() ? map1.data() : static_cast<const float*>(b.ptr(fourbit::kDynamicMapSize * 4));
  p.qmap2 = in.ConsumeBool() ? map2.data() : static_cast<const float*>(b.ptr(fourbit::kDynamicMapSize * 4));
  guarded([&] { b.run ? fourbit::adamw_step(p) : fourbit::validate(p); });
}

void fuzz_parsers(FuzzedDataProvider& in) {
  if (in.ConsumeBool()) {
    const std::string name = in.ConsumeRandomLengthString(16);
    guarded([&] { fourbit::parse_quant_type(name); });
  } else {
    const bool is_signed = in.ConsumeBool();
    const int exp_bits = in.ConsumeIntegral<int>(), total_bits = in.ConsumeIntegral<int>();
    guarded([&] { fourbit::create_dynamic_map(is_signed, exp_bits, total_bits); });
  }
  (void)fourbit::is_valid_blocksize(in.ConsumeIntegral<int64_t>());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  switch (in.ConsumeIntegralInRange<int>(0, 5)) {
    case 0: fuzz_quantize_4bit(in); break;
    case 1: fuzz_dequantize_4bit(in); break;
    case 2: fuzz_blockwise(in); break;
    case 3: fuzz_gemm(in); break;
    case 4: fuzz_adamw(in); break;
    default: fuzz_parsers(in); break;
  }
  return 0;
}
