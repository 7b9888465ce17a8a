// CPU impls of torch.ops.fourbit.*: the shared checks of op_impl.cpp + the core's CPU kernels.
#include "op_impl.h"

namespace {

struct NoGuard {
  explicit NoGuard(const at::Tensor&) {}
};

const fourbit::binding::DeviceKernels kCpuKernels{
    &fourbit::quantize_4bit, &fourbit::dequantize_4bit, &fourbit::quantize_blockwise,
    &fourbit::dequantize_blockwise};

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  fourbit::binding::register_device_impls<kCpuKernels, NoGuard>(m);
}
