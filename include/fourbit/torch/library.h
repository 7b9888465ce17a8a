// fourbit::torch (libfourbit_torch): the library that registers torch.ops.fourbit.* (their
// schemas and CPU/CUDA kernels) when it is loaded, and holds the C++ trainer API: nn.h
// (modules), optim.h (optimizers), serialize.h (checkpoints and PEFT adapters).
#pragma once

namespace fourbit {

// The library's version ("0.1.0"). Calling it also makes sure a program links the library,
// so that loading the program registers the ops with the dispatcher.
const char* torch_library_version();

}  // namespace fourbit
