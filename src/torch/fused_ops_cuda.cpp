// algo="fused" of gemm_4bit / gemm_4bit_grad_input on CUDA: the weight's fragment-layout copy
// (include/fourbit/detail/fragment_layout.h) from a small cache, then the fused kernels of
// cuda/gemm_4bit_fused.cu with their split-K workspace from torch's caching allocator.
// algo="fused_sm90": the same copy, forward by cuda/gemm_4bit_fused_sm90.cu (Hopper wgmma).
//
// The cache: up to kFragmentCacheEntries weights, least recently used out. An entry holds
// references to the weight's code and scale tensors (so their storage cannot be freed and
// reused while the entry lives) and their version counters at repack time (an in-place
// write to either makes the entry stale, and it is rebuilt). The fragment copy has the
// packed weight's size: caching costs that much device memory per cached weight.
// Streams: the copy is made on the first caller's stream; a call on another stream waits
// for the repack's event and records its stream on the copy's memory (so an eviction cannot
// hand the memory back while that stream still reads it).
// Checkpoints never see it. (The copy's proper home is the parameter object, built when
// the weight is quantized or loaded; until then this cache serves the explicit algo.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <list>
#include <memory>
#include <mutex>

#include "checks.h"
#include "fourbit/gemm_fused.h"
#include "gemm_ops.h"
#include "gemm_ops_cuda.h"

namespace fourbit {
namespace binding {
namespace {

constexpr size_t kFragmentCacheEntries = 64;  // > the 7 projections x a few layers a benchmark touches

struct FragmentEntry {
  at::Tensor W, absmax;                    // the source tensors (kept alive)
  int64_t W_version = 0, absmax_version = 0;
  int64_t N = 0, K = 0, blocksize = 0;
  at::Tensor packed, scales;               // the fragment copy
  cudaStream_t made_on = nullptr;          // the stream the repack ran on
  std::shared_ptr<CUevent_st> ready;       // recorded after the repack
};

bool same_source(const FragmentEntry& e, const at::Tensor& W, const at::Tensor& absmax, const Weight4bit& w) {
  return e.W.is_alias_of(W) && e.W.storage_offset() == W.storage_offset() && e.absmax.is_alias_of(absmax) &&
         e.absmax.storage_offset() == absmax.storage_offset() && e.N == w.N && e.K == w.K &&
         e.blocksize == w.blocksize;
}

std::mutex cache_mutex;
std::list<FragmentEntry> cache;  // front: most recently used

// The fragment copy of `w` (W, absmax: its tensors), repacked on `stream` when not cached.
FragmentEntry fragments(const at::Tensor& W, const at::Tensor& absmax, const Weight4bit& w) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (!same_source(*it, W, absmax, w)) continue;
    if (it->W_version == W._version() && it->absmax_version == absmax._version()) {
      cache.splice(cache.begin(), cache, it);
      return cache.front();
    }
    cache.erase(it);  // stale: written in place since the repack
    break;
  }
  FragmentEntry e{W, absmax, W._version(), absmax._version(), w.N, w.K, w.blocksize, {}, {}, current_stream(), {}};
  const auto bytes = W.options().dtype(at::kByte);
  e.packed = at::empty({fragment_packed_bytes(w.N, w.K)}, bytes);
  const int64_t count = fragment_scale_count(w.N, w.K, w.blocksize);
  e.scales = w.scales.nested() ? at::empty({count}, bytes) : at::empty({count}, W.options().dtype(at::kFloat));
  run_core([&] { repack_4bit_fragments_cuda(w, e.packed.data_ptr<uint8_t>(), e.scales.data_ptr(), current_stream()); });
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  e.ready = std::shared_ptr<CUevent_st>(event, [](cudaEvent_t ev) { cudaEventDestroy(ev); });
  C10_CUDA_CHECK(cudaEventRecord(event, e.made_on));
  cache.push_front(e);
  if (cache.size() > kFragmentCacheEntries) cache.pop_back();
  return e;
}

// `w` with its codes and scales pointing at the fragment copy, made safe to read on the
// current stream.
Weight4bit on_fragments(Weight4bit w, const FragmentEntry& e) {
  const cudaStream_t stream = current_stream();
  if (stream != e.made_on) {
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, e.ready.get(), 0));
    c10::cuda::CUDACachingAllocator::recordStream(e.packed.storage().data_ptr(), current);
    c10::cuda::CUDACachingAllocator::recordStream(e.scales.storage().data_ptr(), current);
  }
  w.packed = e.packed.const_data_ptr<uint8_t>();
  if (w.scales.nested()) {
    w.scales.absmax_q = e.scales.const_data_ptr<uint8_t>();
  } else {
    w.scales.absmax = e.scales.const_data_ptr<float>();
  }
  return w;
}

void check_supported(const Weight4bit& w, const char* op) {
  CHECK_ARG(fragment_layout_supported(w), op, ": algo 'fused' needs K % 64 == 0 and K % blocksize == 0, "
            "got N=", w.N, " K=", w.K, " blocksize=", w.blocksize, "; use algo='auto'");
}

}  // namespace

void fused_forward(const ForwardCall& call) {
  const Gemm4bitParams& p = call.params;
  check_supported(p.weight, "gemm_4bit");
  const FragmentEntry e = fragments(call.W, call.absmax, p.weight);
  Gemm4bitFusedParams fp;
  fp.gemm = p;
  fp.gemm.weight = on_fragments(p.weight, e);
  at::Tensor workspace;
  run_core([&] { fp.workspace_bytes = gemm_4bit_fused_workspace_bytes(p.M, p.weight.N, p.weight.K); });
  if (fp.workspace_bytes > 0) {
    workspace = at::empty({fp.workspace_bytes}, call.x.options().dtype(at::kByte));
    fp.workspace = workspace.data_ptr();
  }
  run_core([&] { gemm_4bit_fused_cuda(fp, current_stream()); });
}

void fused_sm90_forward(const ForwardCall& call) {
  const Gemm4bitParams& p = call.params;
  check_supported(p.weight, "gemm_4bit");
  bool supported = false;
  run_core([&] { supported = fused_sm90_supported(); });
  CHECK_ARG(supported, "gemm_4bit: algo 'fused_sm90' needs an sm90 (Hopper) GPU and a build with sm_90a code "
            "(FOURBIT_CUDA_ARCHS containing 90a); use algo='fused' or 'auto'");
  const FragmentEntry e = fragments(call.W, call.absmax, p.weight);
  Gemm4bitParams fp = p;
  fp.weight = on_fragments(p.weight, e);
  run_core([&] { gemm_4bit_fused_sm90_cuda(fp, current_stream()); });
}

void fused_grad_input(const GradInputCall& call) {
  const Gemm4bitGradInputParams& p = call.params;
  if (p.weight.N == 0) {  // an empty reduction: dX = 0
    call.grad_input.zero_();
    return;
  }
  check_supported(p.weight, "gemm_4bit_grad_input");
  CHECK_ARG(p.weight.N % 8 == 0, "gemm_4bit_grad_input: algo 'fused' needs N % 8 == 0, got N=", p.weight.N);
  const FragmentEntry e = fragments(call.W, call.absmax, p.weight);
  Gemm4bitFusedGradInputParams fp;
  fp.gemm = p;
  fp.gemm.weight = on_fragments(p.weight, e);
  at::Tensor workspace;
  run_core([&] {
    fp.workspace_bytes = gemm_4bit_fused_grad_input_workspace_bytes(p.M, p.weight.N, p.weight.K);
  });
  if (fp.workspace_bytes > 0) {
    workspace = at::empty({fp.workspace_bytes}, call.grad_output.options().dtype(at::kByte));
    fp.workspace = workspace.data_ptr();
  }
  run_core([&] { gemm_4bit_fused_grad_input_cuda(fp, current_stream()); });
}

}  // namespace binding
}  // namespace fourbit
