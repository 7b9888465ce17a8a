// CUDA entry points of the optimizer and the page manager in a CPU-only build: each throws
// a clear Runtime error (host paged buffers still work; see include/fourbit/paging.h).
#include "fourbit/error.h"
#include "fourbit/optim.h"
#include "fourbit/paging.h"

namespace fourbit {
namespace {
[[noreturn]] void no_cuda(const char* op) {
  throw Error(Error::Kind::Runtime,
              detail::concat(op, ": libfourbit was built without CUDA (FOURBIT_CUDA=OFF or no "
                             "CUDA compiler found); rebuild with FOURBIT_CUDA=ON"));
}
}  // namespace

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
