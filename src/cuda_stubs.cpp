// CUDA entry points of a CPU-only build: each throws a clear Runtime error. (Host paged
// buffers still work in such a build; see include/fourbit/paging.h.)
#include "fourbit/error.h"
#include "fourbit/gemm.h"
#include "fourbit/gemm_fused.h"
#include "fourbit/lora.h"
#include "fourbit/optim.h"
#include "fourbit/paging.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace {
[[noreturn]] void no_cuda(const char* op) {
  throw Error(Error::Kind::Runtime,
              detail::concat(op, ": libfourbit was built without CUDA (FOURBIT_CUDA=OFF or no "
                             "CUDA compiler found); rebuild with FOURBIT_CUDA=ON"));
}
}  // namespace

bool built_with_cuda() { return false; }
void quantize_4bit_cuda(const Quantize4bitParams&, cudaStream_t) { no_cuda("quantize_4bit_cuda"); }
void dequantize_4bit_cuda(const Dequantize4bitParams&, cudaStream_t) {
  no_cuda("dequantize_4bit_cuda");
}
void quantize_blockwise_cuda(const QuantizeBlockwiseParams&, cudaStream_t) {
  no_cuda("quantize_blockwise_cuda");
}
void dequantize_blockwise_cuda(const DequantizeBlockwiseParams&, cudaStream_t) {
  no_cuda("dequantize_blockwise_cuda");
}
void gemm_4bit_cuda(const Gemm4bitParams&, cudaStream_t, Gemm4bitAlgo) { no_cuda("gemm_4bit_cuda"); }
void gemm_4bit_grad_input_cuda(const Gemm4bitGradInputParams&, cudaStream_t, Gemm4bitAlgo) {
  no_cuda("gemm_4bit_grad_input_cuda");
}
void repack_4bit_fragments_cuda(const Weight4bit&, uint8_t*, void*, cudaStream_t) {
  no_cuda("repack_4bit_fragments_cuda");
}
int64_t gemm_4bit_fused_workspace_bytes(int64_t, int64_t, int64_t) {
  no_cuda("gemm_4bit_fused_workspace_bytes");
}
void gemm_4bit_fused_cuda(const Gemm4bitFusedParams&, cudaStream_t) { no_cuda("gemm_4bit_fused_cuda"); }
bool fused_sm90_supported() { return false; }
void gemm_4bit_fused_sm90_cuda(const Gemm4bitParams&, cudaStream_t) { no_cuda("gemm_4bit_fused_sm90_cuda"); }
int64_t gemm_4bit_fused_grad_input_workspace_bytes(int64_t, int64_t, int64_t) {
  no_cuda("gemm_4bit_fused_grad_input_workspace_bytes");
}
void gemm_4bit_fused_grad_input_cuda(const Gemm4bitFusedGradInputParams&, cudaStream_t) {
  no_cuda("gemm_4bit_fused_grad_input_cuda");
}
void lora_4bit_forward_cuda(const Lora4bitForwardParams&, cudaStream_t) {
  no_cuda("lora_4bit_forward_cuda");
}
void lora_4bit_backward_cuda(const Lora4bitBackwardParams&, cudaStream_t) {
  no_cuda("lora_4bit_backward_cuda");
}
void adamw_step_cuda(const AdamWMultiTensorParams&, cudaStream_t) { no_cuda("adamw_step_cuda"); }
void adamw_step_32bit_cuda(const AdamW32bitParams&, cudaStream_t) {
  no_cuda("adamw_step_32bit_cuda");
}
void adamw_step_8bit_cuda(const AdamW8bitParams&, cudaStream_t) { no_cuda("adamw_step_8bit_cuda"); }

namespace detail {
void* managed_alloc(int64_t, int) { no_cuda("paged allocation on a CUDA device"); }
void managed_free(void*) { no_cuda("managed_free"); }
void managed_prefetch(const void*, int64_t, int, cudaStream_t) { no_cuda("paged prefetch"); }
MemoryInfo device_memory_info(int) { no_cuda("memory_info of a CUDA device"); }
}  // namespace detail
}  // namespace fourbit
