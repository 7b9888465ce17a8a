// The version query of libfourbit_torch (include/fourbit/torch/library.h).
#include "fourbit/torch/library.h"

namespace fourbit {

const char* torch_library_version() { return FOURBIT_VERSION_STRING; }

}  // namespace fourbit
