// Calls a torch.ops.fourbit.* operator from C++ through the dispatcher (boxed: the same
// registration, device dispatch and argument checks as a Python call), for the modules and
// optimizers of the C++ API.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <vector>

namespace fourbit {
namespace detail {

// Runs fourbit::<name> on `args` and returns its outputs. `name` must be a string literal
// naming a registered op; its handle is looked up once per call site.
#define FOURBIT_CALL_OP(name, ...)                                                               \
  ([&]() {                                                                                       \
    static const c10::OperatorHandle op_handle =                                                 \
        c10::Dispatcher::singleton().findSchemaOrThrow("fourbit::" name, "");                    \
    std::vector<c10::IValue> stack{__VA_ARGS__};                                                 \
    op_handle.callBoxed(&stack);                                                                 \
    return stack;                                                                                \
  }())

}  // namespace detail
}  // namespace fourbit
