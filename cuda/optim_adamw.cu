// CUDA AdamW step over a table of tensors (a whole parameter group) in ONE launch: 32-bit
// states, and 8-bit blockwise states dequantized, updated in fp32 and requantized in the same
// pass. The CPU twin is src/optim_adamw.cpp; both compute the same bits (same fp32 operation
// order, explicit FMAs, IEEE division and square root; the library builds with -fmad=false).
//
// Work decomposition (one CTA = one chunk of one tensor):
//
//   table:  [ tensor 0: chunks 0..c0) [ tensor 1: chunks c0..c1) ...   (first_chunk = prefix sum)
//   chunk:  kChunkElements = 8 warps x 256 elements
//   warp:   one 256-element absmax block of the 8-bit states
//   lane:   8 consecutive elements -> one 16-byte load of bf16/fp16 params and grads
//           (two for fp32), one 8-byte load of each uint8 state
//
// A CTA finds its tensor by a binary search over first_chunk (kept in shared memory), so
// hundreds of LoRA tensors of different sizes and dtypes share one launch without padding.
// 8-bit: the block's new absmax is a warp-shuffle max (no shared memory, no second pass),
// and each value's nearest code is an 8-step branchless search over the map in shared memory.
// The table is copied to the device on the same stream through a ring of kStagingSlots
// reused pinned + device buffers (grown, never allocated per step): the host waits only when
// that many earlier steps are still queued on the GPU.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "fourbit/codebook.h"
#include "fourbit/optim.h"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kWarpsPerCta = 8;
constexpr int kElementsPerLane = 8;  // 16 bytes of bf16: one vector load per lane
constexpr int64_t kBlock = kAdamW8bitBlocksize;  // = 32 lanes x 8 elements
constexpr int64_t kChunkElements = kWarpsPerCta * kBlock;
// Tables up to this many tensors keep their first_chunk column in shared memory (8 KiB), so
// a CTA finds a chunk's tensor with ~11 shared-memory loads instead of dependent L2 loads.
constexpr int kSmemTableEntries = 2048;
static_assert(32 * kElementsPerLane == kBlock, "a warp covers exactly one absmax block");

// One tensor of the device-side table.
struct DeviceEntry {
  void* param;
  const void* grad;
  void* state1;
  void* state2;
  float* absmax1;
  float* absmax2;
  int64_t numel;
  int64_t first_chunk;
  detail::AdamWCoefficients coeff;
  int dtype;      // DType
  int bits8;      // 1: uint8 states
  int vector_ok;  // 1: every pointer is 16-byte aligned -> vector loads
  int pad;
};

template <typename T>
__device__ __forceinline__ void load8(const T* src, int valid, bool vec, float (&out)[8]);

template <>
__device__ __forceinline__ void load8<float>(const float* src, int valid, bool vec, float (&out)[8]) {
  if (vec && valid == 8) {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = j < valid ? src[j] : 0.0f;
}

template <typename T>
__device__ __forceinline__ void load8(const T* src, int valid, bool vec, float (&out)[8]) {
  if (vec && valid == 8) {
    const uint4 raw = reinterpret_cast<const uint4*>(src)[0];
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = to_float(h[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = j < valid ? to_float(src[j]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, int valid, bool vec, const float (&in)[8]) {
  if constexpr (std::is_same_v<T, float>) {
    if (vec && valid == 8) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(in[0], in[1], in[2], in[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(in[4], in[5], in[6], in[7]);
      return;
    }
  } else {
    if (vec && valid == 8) {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) h[j] = from_float<T>(in[j]);
      reinterpret_cast<uint4*>(dst)[0] = raw;
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < valid) dst[j] = from_float<T>(in[j]);
  }
}

__device__ __forceinline__ void load_codes(const uint8_t* src, int valid, bool vec, uint8_t (&out)[8]) {
  if (vec && valid == 8) {
    const uint2 raw = reinterpret_cast<const uint2*>(src)[0];
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = b[j];
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = j < valid ? src[j] : 0;
}

__device__ __forceinline__ void store_codes(uint8_t* dst, int valid, bool vec, const uint8_t (&in)[8]) {
  if (vec && valid == 8) {
    uint2 raw;
    uint8_t* b = reinterpret_cast<uint8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) b[j] = in[j];
    reinterpret_cast<uint2*>(dst)[0] = raw;
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < valid) dst[j] = in[j];
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One warp's 256-element block of one tensor.
template <typename T>
__device__ void update_block(const DeviceEntry& e, int64_t block, int lane, const float* qmap1,
                             const float* qmap2) {
  const int64_t first = block * kBlock + lane * kElementsPerLane;
  const int64_t remaining = e.numel - first;
  const int valid = remaining <= 0 ? 0 : (remaining >= 8 ? 8 : static_cast<int>(remaining));
  const bool vec = e.vector_ok != 0;
  const detail::AdamWCoefficients c = e.coeff;
  T* param = static_cast<T*>(e.param) + first;
  const T* grad = static_cast<const T*>(e.grad) + first;

  float p[8], g[8], m[8], v[8];
  load8<T>(param, valid, vec, p);
  load8<T>(grad, valid, vec, g);
  uint8_t q1[8], q2[8];
  float* m32 = nullptr;
  float* v32 = nullptr;
  if (e.bits8) {
    load_codes(static_cast<const uint8_t*>(e.state1) + first, valid, vec, q1);
    load_codes(static_cast<const uint8_t*>(e.state2) + first, valid, vec, q2);
    const float a1 = e.absmax1[block], a2 = e.absmax2[block];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      m[j] = detail::dequant_value(qmap1[q1[j]], a1);
      v[j] = detail::dequant_value(qmap2[q2[j]], a2);
    }
  } else {
    m32 = static_cast<float*>(e.state1) + first;
    v32 = static_cast<float*>(e.state2) + first;
    load8<float>(m32, valid, vec, m);
    load8<float>(v32, valid, vec, v);
  }

  const detail::AdamWLerp lerp = detail::adamw_lerp(c);
#pragma unroll
  for (int j = 0; j < 8; ++j) detail::adamw_update(p[j], g[j], m[j], v[j], c, lerp, e.bits8);
  store8<T>(param, valid, vec, p);

  if (!e.bits8) {
    store8<float>(m32, valid, vec, m);
    store8<float>(v32, valid, vec, v);
    return;
  }
  float am1 = 0.0f, am2 = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < valid) {
      // Finite moments only, as the CPU twin ("Non-finite gradients" in src/optim_adamw.cpp).
      am1 = detail::max_abs_finite(am1, m[j]);
      am2 = detail::max_abs_finite(am2, v[j]);
    }
  }
  am1 = warp_max(am1);
  am2 = warp_max(am2);
  if (lane == 0) {
    e.absmax1[block] = am1;
    e.absmax2[block] = am2;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    q1[j] = detail::quantize_8bit(m[j], am1, qmap1);
    q2[j] = detail::quantize_8bit(v[j], am2, qmap2);
  }
  store_codes(static_cast<uint8_t*>(e.state1) + first, valid, vec, q1);
  store_codes(static_cast<uint8_t*>(e.state2) + first, valid, vec, q2);
}

// At least 2 CTAs (16 warps) per SM: ptxas then keeps everything in 96 registers without
// spills (-Xptxas -v, sm_80 and sm_90a); 16 warps x 8 elements x ~80 bytes per lane keep
// ~64 KiB of loads in flight per SM, several times what HBM latency x bandwidth needs.
__global__ void __launch_bounds__(kWarpsPerCta * 32, 2)
    adamw_multi_tensor_kernel(const DeviceEntry* __restrict__ table, int num_entries,
                              int64_t total_chunks, const float* qmap1_g, const float* qmap2_g) {
  __shared__ float qmap1[kDynamicMapSize];
  __shared__ float qmap2[kDynamicMapSize];
  if (qmap1_g != nullptr) {
    for (int k = threadIdx.x; k < kDynamicMapSize; k += blockDim.x) {
      qmap1[k] = qmap1_g[k];
      qmap2[k] = qmap2_g[k];
    }
  }
  __shared__ int32_t first_chunk[kSmemTableEntries];  // host checks total_chunks < 2^31
  const bool smem_table = num_entries <= kSmemTableEntries;
  if (smem_table) {
    for (int k = threadIdx.x; k < num_entries; k += blockDim.x) first_chunk[k] = static_cast<int32_t>(table[k].first_chunk);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    // Last entry whose first_chunk <= chunk.
    int lo = 0, hi = num_entries - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      const int64_t f = smem_table ? first_chunk[mid] : table[mid].first_chunk;
      if (f <= chunk) lo = mid; else hi = mid - 1;
    }
    const DeviceEntry& e = table[lo];
    const int64_t block = (chunk - e.first_chunk) * kWarpsPerCta + warp;
    if (block * kBlock >= e.numel) continue;  // whole warp: uniform
    switch (static_cast<DType>(e.dtype)) {
      case DType::Float16: update_block<__half>(e, block, lane, qmap1, qmap2); break;
      case DType::BFloat16: update_block<__nv_bfloat16>(e, block, lane, qmap1, qmap2); break;
      case DType::Float32: update_block<float>(e, block, lane, qmap1, qmap2); break;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Staging slots per device: a step reuses a slot once the event recorded after the kernel
// that read it has fired, so up to this many steps can be queued without a host wait.
constexpr int kStagingSlots = 4;

// A pinned host buffer and a device buffer through which one table reaches the kernel (a
// true async H2D copy); `done` fires after the kernel that read the device copy.
struct StagingSlot {
  void* pinned = nullptr;
  void* device = nullptr;
  size_t capacity = 0;
  cudaEvent_t done = nullptr;
  bool pending = false;
};
struct DeviceStaging {
  StagingSlot slots[kStagingSlots];
  int next = 0;
};
constexpr int kMaxDevices = 64;
std::mutex staging_mutex;
DeviceStaging staging[kMaxDevices];

// True when the slot's last kernel has finished (or it never ran one).
bool slot_free(const StagingSlot& s) {
  if (!s.pending) return true;
  const cudaError_t q = cudaEventQuery(s.done);
  if (q == cudaSuccess) return true;
  FOURBIT_CHECK_RUNTIME(q == cudaErrorNotReady, "adamw: cudaEventQuery: ", cudaGetErrorString(q));
  const cudaError_t last = cudaGetLastError();  // clears the not-ready status
  FOURBIT_CHECK_RUNTIME(last == cudaSuccess || last == cudaErrorNotReady, "adamw: CUDA error: ",
                        cudaGetErrorString(last));
  return false;
}

// A slot of `d` with room for `bytes`: the first free one, else the oldest after waiting.
StagingSlot& acquire_slot(DeviceStaging& d, size_t bytes) {
  int pick = -1;
  for (int k = 0; k < kStagingSlots && pick < 0; ++k) {
    const int i = (d.next + k) % kStagingSlots;
    if (slot_free(d.slots[i])) pick = i;
  }
  if (pick < 0) {  // kStagingSlots steps in flight: back-pressure
    pick = d.next;
    FOURBIT_CUDA_CHECK(cudaEventSynchronize(d.slots[pick].done));
  }
  d.next = (pick + 1) % kStagingSlots;
  StagingSlot& s = d.slots[pick];
  s.pending = false;
  if (s.done == nullptr) FOURBIT_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  if (s.capacity < bytes) {  // grows geometrically: a handful of allocations per process
    if (s.pinned) FOURBIT_CUDA_CHECK(cudaFreeHost(s.pinned));
    if (s.device) FOURBIT_CUDA_CHECK(cudaFree(s.device));
    s.pinned = s.device = nullptr;
    s.capacity = 0;
    FOURBIT_CUDA_CHECK(cudaMallocHost(&s.pinned, bytes * 2));
    FOURBIT_CUDA_CHECK(cudaMalloc(&s.device, bytes * 2));
    s.capacity = bytes * 2;
  }
  return s;
}

}  // namespace
}  // namespace cuda

void adamw_step_cuda(const AdamWMultiTensorParams& p, cudaStream_t stream) {
  validate(p);
  std::vector<cuda::DeviceEntry> entries;
  entries.reserve(static_cast<size_t>(p.num_tensors));
  int64_t total_chunks = 0;
  for (int64_t i = 0; i < p.num_tensors; ++i) {
    const AdamWTensor& t = p.tensors[i];
    if (t.numel == 0) continue;
    cuda::DeviceEntry e{};
    e.param = t.param;
    e.grad = t.grad;
    e.state1 = t.state1;
    e.state2 = t.state2;
    e.absmax1 = t.absmax1;
    e.absmax2 = t.absmax2;
    e.numel = t.numel;
    e.first_chunk = total_chunks;
    e.coeff = detail::adamw_coefficients(p.hyper, t.step);
    e.dtype = static_cast<int>(t.dtype);
    e.bits8 = t.bits == StateBits::Bits8 ? 1 : 0;
    e.vector_ok = cuda::aligned16(t.param) && cuda::aligned16(t.grad) && cuda::aligned16(t.state1) &&
                  cuda::aligned16(t.state2);
    entries.push_back(e);
    total_chunks += (t.numel + cuda::kChunkElements - 1) / cuda::kChunkElements;
  }
  if (entries.empty()) return;
  FOURBIT_CHECK_ARG(entries.size() < (size_t{1} << 31), "adamw: too many tensors: ", entries.size());
  FOURBIT_CHECK_ARG(total_chunks < (int64_t{1} << 31), "adamw: too many elements in one group: ",
                    total_chunks, " chunks of ", cuda::kChunkElements);
  bool any8 = false;
  for (const auto& e : entries) any8 = any8 || e.bits8;

  int device = 0;
  FOURBIT_CUDA_CHECK(cudaGetDevice(&device));
  FOURBIT_CHECK_RUNTIME(device < cuda::kMaxDevices, "adamw: device ordinal ", device, " >= ",
                        cuda::kMaxDevices);
  const size_t bytes = entries.size() * sizeof(cuda::DeviceEntry);
  const unsigned int grid = cuda::grid_for(total_chunks, 1);
  std::lock_guard<std::mutex> lock(cuda::staging_mutex);
  cuda::StagingSlot& s = cuda::acquire_slot(cuda::staging[device], bytes);
  std::memcpy(s.pinned, entries.data(), bytes);
  FOURBIT_CUDA_CHECK(cudaMemcpyAsync(s.device, s.pinned, bytes, cudaMemcpyHostToDevice, stream));
  cuda::adamw_multi_tensor_kernel<<<grid, cuda::kWarpsPerCta * 32, 0, stream>>>(
      static_cast<const cuda::DeviceEntry*>(s.device), static_cast<int>(entries.size()), total_chunks,
      any8 ? p.qmap1 : nullptr, any8 ? p.qmap2 : nullptr);
  FOURBIT_CUDA_LAUNCH_CHECK();
  FOURBIT_CUDA_CHECK(cudaEventRecord(s.done, stream));
  s.pending = true;
}

void adamw_step_32bit_cuda(const AdamW32bitParams& p, cudaStream_t stream) {
  detail::with_one_tensor_table(
      p, [&](const AdamWMultiTensorParams& mp) { adamw_step_cuda(mp, stream); });
}

void adamw_step_8bit_cuda(const AdamW8bitParams& p, cudaStream_t stream) {
  detail::with_one_tensor_table(
      p, [&](const AdamWMultiTensorParams& mp) { adamw_step_cuda(mp, stream); });
}

}  // namespace fourbit
