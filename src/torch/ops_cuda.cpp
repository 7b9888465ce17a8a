// CUDA impls of torch.ops.fourbit.*: the shared checks of op_impl.cpp + the core's CUDA
// kernels, launched on the current stream of the input's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "op_impl.h"

namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void quantize_4bit(const fourbit::Quantize4bitParams& p) {
  fourbit::quantize_4bit_cuda(p, current_stream());
}
void dequantize_4bit(const fourbit::Dequantize4bitParams& p) {
  fourbit::dequantize_4bit_cuda(p, current_stream());
}
void quantize_blockwise(const fourbit::QuantizeBlockwiseParams& p) {
  fourbit::quantize_blockwise_cuda(p, current_stream());
}
void dequantize_blockwise(const fourbit::DequantizeBlockwiseParams& p) {
  fourbit::dequantize_blockwise_cuda(p, current_stream());
}

struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& A) : guard(A.device()) {}
  c10::cuda::CUDAGuard guard;
};

const fourbit::binding::DeviceKernels kCudaKernels{&quantize_4bit, &dequantize_4bit,
                                                   &quantize_blockwise, &dequantize_blockwise};

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  fourbit::binding::register_device_impls<kCudaKernels, DeviceGuard>(m);
}
