// Error types of the kvttl core.
//
// Misuse raises; a capacity shortfall never does (it is a normal result, see
// BlockPool::allocate and LeaseTable::grant). Every throwing call validates all
// of its input before it touches state, so a call that throws changed nothing.
// The bindings map each type onto the Python class of the same name in
// kvttl.errors.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kvttl {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A value is malformed: wrong length, NaN or negative time, duplicate id in a
// batch, a block in the wrong state for the operation.
class BadArgument : public Error {
 public:
  using Error::Error;
};

// An id is outside [0, num_blocks), or names a free block (one that holds no
// content) where content is required.
class UnknownBlock : public Error {
 public:
  using Error::Error;
};

// A reference is dropped that nobody holds.
class DoubleFree : public Error {
 public:
  using Error::Error;
};

// A request can never be met by this pool, whatever is freed (n > capacity).
class OutOfBlocks : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// User-error check: always on, throws the given type with a composed message.
#define KVTTL_CHECK(cond, ErrorType, ...)                      \
  do {                                                         \
    if (!(cond)) throw ErrorType(::kvttl::detail::cat(__VA_ARGS__)); \
  } while (0)

// Invariant check: always on. A failure is a bug in kvttl, not in the caller.
#define KVTTL_INVARIANT(cond)                                                  \
  do {                                                                         \
    if (!(cond))                                                               \
      throw ::kvttl::Error(::kvttl::detail::cat("kvttl internal invariant failed: ", \
                                                #cond, " at ", __FILE__, ":", __LINE__)); \
  } while (0)

// Debug check: compiled in debug and sanitizer builds (CI), out of release builds.
#ifdef KVTTL_DEBUG_CHECKS
#define KVTTL_DCHECK(cond) KVTTL_INVARIANT(cond)
#else
#define KVTTL_DCHECK(cond) \
  do {                     \
  } while (0)
#endif

}  // namespace kvttl
