// fourbit::Error: the one exception type the core throws.
//
// Every entry point validates its arguments and throws an Error whose message names the
// argument and the bad value. `kind` tells bindings how to surface it: InvalidArgument
// becomes a Python ValueError, Runtime (a failed CUDA call, say) a RuntimeError.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fourbit {

class Error : public std::runtime_error {
 public:
  enum class Kind { InvalidArgument, Runtime };

  Error(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}

  Kind kind() const noexcept { return kind_; }

 private:
  Kind kind_;
};

namespace detail {

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

}  // namespace detail
}  // namespace fourbit

// FOURBIT_CHECK_ARG(cond, parts...): throw an InvalidArgument Error built from `parts`.
#define FOURBIT_CHECK_ARG(cond, ...)                                                   \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      throw ::fourbit::Error(::fourbit::Error::Kind::InvalidArgument,                  \
                             ::fourbit::detail::concat(__VA_ARGS__));                  \
    }                                                                                  \
  } while (0)

// FOURBIT_CHECK_RUNTIME(cond, parts...): throw a Runtime Error built from `parts`.
#define FOURBIT_CHECK_RUNTIME(cond, ...)                                               \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      throw ::fourbit::Error(::fourbit::Error::Kind::Runtime,                          \
                             ::fourbit::detail::concat(__VA_ARGS__));                  \
    }                                                                                  \
  } while (0)

namespace fourbit {

// a * b for sizes (a, b >= 0): throws an InvalidArgument Error naming `op` and `what` (e.g.
// "M * K") with both factors when the product does not fit int64. Every element or byte
// count the core derives from caller-given sizes goes through this (or is bounded by one).
inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t out = 0;
  FOURBIT_CHECK_ARG(!__builtin_mul_overflow(a, b, &out), op, ": ", what, " overflows int64 (",
                    a, " * ", b, ")");
  return out;
}

}  // namespace fourbit
