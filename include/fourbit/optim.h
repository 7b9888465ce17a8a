// AdamW optimizer step: 32-bit states and 8-bit blockwise-quantized states, one tensor or a
// whole list of tensors (a parameter group) per call.
//
// One step of one tensor, in fp32 whatever the parameter dtype (fp32 / fp16 / bf16 params
// are read, updated in fp32 and rounded once on the store):
//
//   p  = p * (1 - lr * weight_decay)                 (decoupled weight decay)
//   m  = beta1 * m + (1 - beta1) * g                 (first moment,  state1)
//   v  = beta2 * v + (1 - beta2) * g * g             (second moment, state2)
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//      = p + (-lr * sqrt(1 - beta2^t) / (1 - beta1^t)) * m / (sqrt(v) + eps * sqrt(1 - beta2^t))
//
// with t the tensor's own step count (1 on its first step), as torch.optim.AdamW and
// bitsandbytes compute it. The exact fp32 operation order is documented in docs/kernels.md:
// the 32-bit moments follow torch.optim.AdamW's CPU arithmetic (the first moment via a
// lerp with one fused multiply-add), the 8-bit ones bitsandbytes' (m * beta1 + g * (1 - beta1),
// no FMA); the parameter update is the second form above (bitsandbytes'), one square root
// and one division per element. The CPU and CUDA kernels give identical bits.
//
// 8-bit states (bitsandbytes' blockwise "dynamic" optimizer): state1 and state2 are uint8
// codes into two 256-entry sorted maps (qmap1 signed, qmap2 unsigned:
// create_dynamic_map(true / false)) with one fp32 absmax per block of kAdamW8bitBlocksize
// elements. A step dequantizes (code value * absmax), updates in fp32, and requantizes with
// a fresh absmax per block, exactly as quantize_blockwise() would quantize the new fp32
// states (nearest code, ties to the lower index), all in one pass over memory.
//
// The multi-tensor entry points take a table of tensors (any mix of dtypes, sizes and of
// 32-bit / 8-bit states) and run ONE parallel region (CPU) or ONE kernel launch (CUDA) for
// the whole table. Hyper-parameters are doubles, converted to fp32 coefficients once on the
// host exactly as torch converts Python scalars.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fourbit/types.h"

// Same type as the CUDA runtime's cudaStream_t, so this header needs no CUDA headers.
typedef struct CUstream_st* cudaStream_t;

namespace fourbit {

// Elements per absmax block of the 8-bit states (bitsandbytes' blockwise optimizers use 256).
constexpr int64_t kAdamW8bitBlocksize = 256;

// The hyper-parameters of one parameter group. validate() requires lr >= 0,
// 0 <= beta1, beta2 < 1, eps > 0 and weight_decay >= 0, all finite.
struct AdamWHyperParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// How a tensor's two moments are stored.
enum class StateBits : int { Bits32 = 32, Bits8 = 8 };

// One tensor of a multi-tensor step. All pointers address `numel` contiguous elements
// (absmax1/2: ceil(numel / kAdamW8bitBlocksize) floats) on the same device.
struct AdamWTensor {
  void* param = nullptr;        // [numel] of `dtype`, updated in place
  const void* grad = nullptr;   // [numel] of `dtype`
  DType dtype = DType::Float32;
  StateBits bits = StateBits::Bits32;
  void* state1 = nullptr;       // Bits32: [numel] fp32 exp_avg;    Bits8: [numel] uint8 codes
  void* state2 = nullptr;       // Bits32: [numel] fp32 exp_avg_sq; Bits8: [numel] uint8 codes
  float* absmax1 = nullptr;     // Bits8 only: [blocks] fp32, rewritten by the step
  float* absmax2 = nullptr;     // Bits8 only: [blocks] fp32
  int64_t numel = 0;
  int64_t step = 1;             // this tensor's step count after the update (>= 1)
};

// A whole parameter group: `num_tensors` entries of `tensors` (a host array, also for the
// CUDA entry point), one set of hyper-parameters, and the two 8-bit maps (device memory for
// CUDA; required only when some tensor has Bits8 states).
struct AdamWMultiTensorParams {
  const AdamWTensor* tensors = nullptr;
  int64_t num_tensors = 0;
  AdamWHyperParams hyper;
  const float* qmap1 = nullptr;  // [256] fp32 sorted ascending (signed dynamic map)
  const float* qmap2 = nullptr;  // [256] fp32 sorted ascending (unsigned dynamic map)
};

// Single-tensor forms (each runs as a one-entry table).
struct AdamW32bitParams {
  void* param = nullptr;
  const void* grad = nullptr;
  DType dtype = DType::Float32;
  float* exp_avg = nullptr;     // [numel] fp32
  float* exp_avg_sq = nullptr;  // [numel] fp32
  int64_t numel = 0;
  int64_t step = 1;
  AdamWHyperParams hyper;
};

struct AdamW8bitParams {
  void* param = nullptr;
  const void* grad = nullptr;
  DType dtype = DType::Float32;
  uint8_t* state1 = nullptr;    // [numel]
  uint8_t* state2 = nullptr;    // [numel]
  float* absmax1 = nullptr;     // [ceil(numel / 256)]
  float* absmax2 = nullptr;     // [ceil(numel / 256)]
  const float* qmap1 = nullptr; // [256]
  const float* qmap2 = nullptr; // [256]
  int64_t numel = 0;
  int64_t step = 1;
  AdamWHyperParams hyper;
};

// Argument validation shared by the CPU and CUDA paths (throws InvalidArgument naming the
// argument and its value; table entries are named "tensors[i].field").
void validate(const AdamWHyperParams& h);
void validate(const AdamWMultiTensorParams& p);
void validate(const AdamW32bitParams& p);
void validate(const AdamW8bitParams& p);

// CPU implementations (host pointers).
void adamw_step(const AdamWMultiTensorParams& p);
void adamw_step_32bit(const AdamW32bitParams& p);
void adamw_step_8bit(const AdamW8bitParams& p);

// CUDA implementations (device or managed pointers; enqueued on `stream`, no synchronisation).
// The multi-tensor form copies its table to the device in the same stream and launches one
// kernel for the whole table. Throw a Runtime Error without CUDA or on a failed launch.
void adamw_step_cuda(const AdamWMultiTensorParams& p, cudaStream_t stream);
void adamw_step_32bit_cuda(const AdamW32bitParams& p, cudaStream_t stream);
void adamw_step_8bit_cuda(const AdamW8bitParams& p, cudaStream_t stream);

namespace detail {

// The fp32 coefficients of one step, derived on the host from the double hyper-parameters
// the way torch turns Python scalars into fp32 operands (double arithmetic, one rounding).
struct AdamWCoefficients {
  float decay;             // 1 - lr * weight_decay
  float beta1;             // beta1
  float one_minus_beta1;   // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps_scaled;        // eps * sqrt(1 - beta2^t)
  float neg_step_size;     // -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
};
AdamWCoefficients adamw_coefficients(const AdamWHyperParams& h, int64_t step);

// Expands single-tensor params into a one-entry table.
AdamWTensor as_table_entry(const AdamW32bitParams& p);
AdamWTensor as_table_entry(const AdamW8bitParams& p);

// Calls fn(table) with a one-entry multi-tensor table built from a single-tensor call: how
// every single-tensor entry point reuses its multi-tensor twin.
template <typename Params, typename Fn>
void with_one_tensor_table(const Params& p, Fn&& fn) {
  const AdamWTensor t = as_table_entry(p);
  AdamWMultiTensorParams mp;
  mp.tensors = &t;
  mp.num_tensors = 1;
  mp.hyper = p.hyper;
  if constexpr (std::is_same<Params, AdamW8bitParams>::value) {
    mp.qmap1 = p.qmap1;
    mp.qmap2 = p.qmap2;
  }
  fn(mp);
}

}  // namespace detail
}  // namespace fourbit
