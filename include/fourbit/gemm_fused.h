// The fused 4-bit matmul on the fragment layout (include/fourbit/detail/fragment_layout.h):
// the weight repacked once from bitsandbytes' bytes so that each lane's 16-byte load is its
// tensor-core fragment, then Y = X @ deq(W)^T (+ bias) by cuda/gemm_4bit_fused.cu
// (mma.sync + ldmatrix, multi-stage cp.async pipeline, split-K). The repack is a pure
// permutation (same byte count for the codes); unpack is its inverse, so a checkpoint is
// always written from bitsandbytes' bytes. Supported shapes: K % 64 == 0 and
// K % blocksize == 0 (every Llama / Mistral projection); other weights use the other paths.
#pragma once

#include <cstdint>

#include "fourbit/gemm.h"

namespace fourbit {

// True when the fused kernel can take this weight (K % 64 == 0, K % blocksize == 0).
bool fragment_layout_supported(const Weight4bit& w);

// Sizes of the fragment copy: code bytes (N padded to 16) and scale entries (K / blocksize
// x N padded to 16; fp32 when plain, uint8 when nested).
int64_t fragment_packed_bytes(int64_t N, int64_t K);
int64_t fragment_scale_count(int64_t N, int64_t K, int64_t blocksize);

// CPU: bitsandbytes layout -> fragment layout. `frag_scales` is float* (plain scales) or
// uint8_t* (nested: the absmax_q bytes permuted; the nested arrays are shared as they are).
void repack_4bit_fragments(const Weight4bit& w, uint8_t* frag_packed, void* frag_scales);
// CPU: the inverse (fragment layout -> bitsandbytes bytes and scales), for the round trip.
void unpack_4bit_fragments(const Weight4bit& w, const uint8_t* frag_packed, const void* frag_scales,
                           uint8_t* packed, void* scales);
// CUDA: the same repack on device pointers.
void repack_4bit_fragments_cuda(const Weight4bit& w, uint8_t* frag_packed, void* frag_scales,
                                cudaStream_t stream);

// Y = X deq(W)^T + bias with `weight` in the fragment layout: weight.packed is the fragment
// bytes, weight.scales.absmax / absmax_q the transposed scales (nested_code, nested_absmax,
// offset as in bitsandbytes' layout). `workspace` (fp32, gemm_4bit_fused_workspace_bytes)
// holds the split-K partial sums; it may be null when that size is 0.
struct Gemm4bitFusedParams {
  Gemm4bitParams gemm;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};
int64_t gemm_4bit_fused_workspace_bytes(int64_t M, int64_t N, int64_t K);
void gemm_4bit_fused_cuda(const Gemm4bitFusedParams& p, cudaStream_t stream);

// Hopper (sm_90a) forward on the same fragment copy (cuda/gemm_4bit_fused_sm90.cu): wgmma with
// the decoded weight as its register A operand, meant for M >= 1024; no workspace (no split-K).
// fused_sm90_supported(): the current device is compute capability 9.0 and this build holds
// sm_90a code for it (FOURBIT_CUDA_ARCHS with 90a); gemm_4bit_fused_sm90_cuda refuses otherwise.
bool fused_sm90_supported();
void gemm_4bit_fused_sm90_cuda(const Gemm4bitParams& p, cudaStream_t stream);

// dX = dY deq(W) on the same fragment copy (no bias). Also needs N % 8 == 0.
struct Gemm4bitFusedGradInputParams {
  Gemm4bitGradInputParams gemm;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};
int64_t gemm_4bit_fused_grad_input_workspace_bytes(int64_t M, int64_t N, int64_t K);
void gemm_4bit_fused_grad_input_cuda(const Gemm4bitFusedGradInputParams& p, cudaStream_t stream);

}  // namespace fourbit
