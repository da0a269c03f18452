// The one bindings file: kvttl._core. Converts Python input to spans, maps C++
// errors onto kvttl.errors, and never links torch (arrays cross as buffers /
// DLPack through nb::ndarray).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "kvttl/block_pool.h"
#include "kvttl/lease_table.h"
#include "kvttl/swap.h"
#include "kvttl/swap_engine.h"

#ifdef KVTTL_WITH_CUDA
#include "kvttl/cuda_probe.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using kvttl::BadArgument;
using kvttl::BlockHash;
using kvttl::BlockId;

namespace {

// Why a type of our own rather than numpy arrays: creating a numpy array
// through nanobind costs ~1 us and importing one ~0.5 us, more than the whole
// 64-block operation. BlockIds is an immutable int32 vector that exports the
// buffer protocol (np.asarray(ids) is zero-copy) and is read back without any
// conversion when passed to the next call.
struct BlockIds {
  std::vector<BlockId> ids;
  Py_ssize_t shape = 0;
  Py_ssize_t stride = sizeof(BlockId);
  explicit BlockIds(std::vector<BlockId> v) : ids(std::move(v)), shape(static_cast<Py_ssize_t>(ids.size())) {}
};

BlockId kEmptyIds[1] = {0};

int block_ids_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  BlockIds* b = nb::inst_ptr<BlockIds>(self);
  if (flags & PyBUF_WRITABLE) {
    PyErr_SetString(PyExc_BufferError, "kvttl.BlockIds is read-only");
    view->obj = nullptr;
    return -1;
  }
  view->obj = self;
  Py_INCREF(self);
  view->buf = b->ids.empty() ? kEmptyIds : b->ids.data();
  view->len = b->shape * static_cast<Py_ssize_t>(sizeof(BlockId));
  view->readonly = 1;
  view->itemsize = sizeof(BlockId);
  view->format = (flags & PyBUF_FORMAT) ? const_cast<char*>("i") : nullptr;
  view->ndim = 1;
  view->shape = (flags & PyBUF_ND) ? &b->shape : nullptr;
  view->strides = (flags & PyBUF_STRIDES) ? &b->stride : nullptr;
  view->suboffsets = nullptr;
  view->internal = nullptr;
  return 0;
}

PyType_Slot block_ids_slots[] = {{Py_bf_getbuffer, reinterpret_cast<void*>(block_ids_getbuffer)},
                                 {0, nullptr}};

nb::object make_ids(std::vector<BlockId>&& v) { return nb::cast(BlockIds(std::move(v))); }

// ---- input conversion ------------------------------------------------------

const char* type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

std::string dtype_name(nb::dlpack::dtype dt) {
  static const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const char* kind = dt.code < 7 ? kinds[dt.code] : "unknown";
  return kvttl::detail::cat(kind, int(dt.bits));
}

// The start of an integer's decimal form, for messages (a 400-digit id is
// named by its first digits).
std::string int_text(PyObject* item) {
  PyObject* text = PyObject_Str(item);
  if (!text) {
    PyErr_Clear();
    return "?";
  }
  Py_ssize_t size = 0;
  const char* s = PyUnicode_AsUTF8AndSize(text, &size);
  std::string out = s ? std::string(s, static_cast<size_t>(std::min<Py_ssize_t>(size, 24))) : "?";
  if (!s) PyErr_Clear();
  if (s && size > 24) out += "...";
  Py_DECREF(text);
  return out;
}

// Reads one Python integer (int, numpy integer, anything with __index__).
// Returns false if the object is not an integer; *is_unsigned set when it
// fits only as an unsigned 64-bit value. An integer beyond 64 bits raises
// BadArgument naming `what`, the position (`index` >= 0) and the value.
bool read_int(PyObject* item, long long* value, unsigned long long* uvalue, bool* is_unsigned,
              const char* what, Py_ssize_t index = -1) {
  *is_unsigned = false;
  PyObject* index_obj = nullptr;
  if (!PyLong_Check(item) || PyBool_Check(item)) {
    if (PyBool_Check(item) || PyFloat_Check(item)) return false;
    index_obj = PyNumber_Index(item);
    if (!index_obj) {
      PyErr_Clear();
      return false;
    }
    item = index_obj;
  }
  int overflow = 0;
  *value = PyLong_AsLongLongAndOverflow(item, &overflow);
  if (overflow > 0) {
    *uvalue = PyLong_AsUnsignedLongLong(item);
    if (PyErr_Occurred()) {
      PyErr_Clear();
    } else {
      *is_unsigned = true;
      overflow = 0;
    }
  }
  if (overflow != 0) {
    const std::string text = int_text(item);
    Py_XDECREF(index_obj);
    if (index >= 0)
      throw BadArgument(kvttl::detail::cat(what, ": item ", index, " (", text, ") does not fit in 64 bits"));
    throw BadArgument(kvttl::detail::cat(what, ": ", text, " does not fit in 64 bits"));
  }
  Py_XDECREF(index_obj);
  return true;
}

// Reads a 1-D integer array from a buffer / DLPack object, or returns false.
template <typename Sink>
bool read_array(nb::handle obj, const char* what, Sink&& sink, size_t* count) {
  nb::ndarray<nb::ro, nb::device::cpu> arr;
  if (!nb::try_cast(obj, arr, false)) return false;
  const auto dt = arr.dtype();
  KVTTL_CHECK(arr.ndim() == 1 || (arr.ndim() == 0 && arr.size() == 0), BadArgument, what,
              ": expected a 1-D array, got ", arr.ndim(), " dimensions");
  const bool is_int = dt.code == uint8_t(nb::dlpack::dtype_code::Int);
  const bool is_uint = dt.code == uint8_t(nb::dlpack::dtype_code::UInt);
  KVTTL_CHECK((is_int || is_uint) && (dt.bits == 8 || dt.bits == 16 || dt.bits == 32 || dt.bits == 64),
              BadArgument, what, ": expected an integer array, got dtype ", dtype_name(dt));
  const size_t n = arr.ndim() == 0 ? 0 : arr.shape(0);
  *count = n;
  const int64_t stride = arr.ndim() == 0 ? 1 : arr.stride(0);
  const auto* base = static_cast<const uint8_t*>(arr.data());
  const size_t item = dt.bits / 8;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = base + static_cast<int64_t>(i) * stride * static_cast<int64_t>(item);
    switch (dt.bits | (is_uint ? 1 : 0)) {
      case 8: sink(i, (long long)*reinterpret_cast<const int8_t*>(p), false); break;
      case 9: sink(i, (long long)*p, false); break;
      case 16: sink(i, (long long)*reinterpret_cast<const int16_t*>(p), false); break;
      case 17: sink(i, (long long)*reinterpret_cast<const uint16_t*>(p), false); break;
      case 32: sink(i, (long long)*reinterpret_cast<const int32_t*>(p), false); break;
      case 33: sink(i, (long long)*reinterpret_cast<const uint32_t*>(p), false); break;
      case 64: sink(i, (long long)*reinterpret_cast<const int64_t*>(p), false); break;
      case 65: {
        uint64_t u;
        std::memcpy(&u, p, 8);
        sink(i, (long long)u, u > (uint64_t)LLONG_MAX);
        break;
      }
    }
  }
  return true;
}

// Calls sink(i, value, is_unsigned_overflow) for each integer in a list, tuple,
// array or other iterable of integers.
template <typename Sink>
size_t read_ints(nb::handle obj, const char* what, Sink&& sink, size_t* count) {
  PyObject* o = obj.ptr();
  // An item's __index__ is Python code: it may change the very list being
  // read. So each item is held while it converts, the list's items are
  // re-read after every conversion, and a list that changed size is refused.
  auto from_fast = [&](PyObject* seq) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    *count = static_cast<size_t>(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      KVTTL_CHECK(PySequence_Fast_GET_SIZE(seq) == n, BadArgument, what,
                  ": the list changed size while its items were read");
      PyObject* item = PySequence_Fast_ITEMS(seq)[i];
      long long v;
      unsigned long long u;
      bool is_u;
      if (PyLong_CheckExact(item)) {  // the common case runs no Python code (and an int always reads)
        read_int(item, &v, &u, &is_u, what, i);
      } else {
        Py_INCREF(item);
        bool ok;
        try {
          ok = read_int(item, &v, &u, &is_u, what, i);
        } catch (...) {
          Py_DECREF(item);
          throw;
        }
        if (!ok) {
          const std::string type = type_name(item);
          Py_DECREF(item);
          throw BadArgument(kvttl::detail::cat(what, ": expected integers, item ", i, " is ", type));
        }
        Py_DECREF(item);
      }
      sink(static_cast<size_t>(i), is_u ? (long long)u : v, is_u);
    }
    KVTTL_CHECK(PySequence_Fast_GET_SIZE(seq) == n, BadArgument, what,
                ": the list changed size while its items were read");
  };
  if (PyList_Check(o) || PyTuple_Check(o)) {
    from_fast(o);
    return *count;
  }
  KVTTL_CHECK(!PyUnicode_Check(o) && !PyBytes_Check(o) && o != Py_None, BadArgument, what,
              ": expected a sequence or array of integers, got ", type_name(o));
  if (read_array(obj, what, sink, count)) return *count;
  PyObject* seq = PySequence_Fast(o, "");
  if (!seq) {
    PyErr_Clear();
    throw BadArgument(kvttl::detail::cat(what, ": expected a sequence or array of integers, got ",
                                         type_name(o)));
  }
  try {
    from_fast(seq);
  } catch (...) {
    Py_DECREF(seq);
    throw;
  }
  Py_DECREF(seq);
  return *count;
}

// Block ids into a reusable buffer. The range is checked here, before the
// narrowing to int32, so the message shows the caller's own value.
// Native-endian int32 buffers (BlockIds, numpy int32) are read in place;
// everything else is converted into buf, range-checked on the way.
kvttl::IdSpan parse_ids(nb::handle obj, std::vector<BlockId>& buf, int64_t capacity,
                        const char* what) {
  BlockIds* own = nullptr;
  if (nb::try_cast<BlockIds*>(obj, own, false) && own) return {own->ids.data(), own->ids.size()};
  if (!PyList_Check(obj.ptr()) && PyObject_CheckBuffer(obj.ptr())) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
      const char* f = view.format ? view.format : "B";
      if (*f == '@' || *f == '=') ++f;
      const bool int32 = view.itemsize == 4 && (f[0] == 'i' || f[0] == 'l') && f[1] == 0;
      if (int32 && view.ndim == 1) {
        buf.assign(static_cast<const BlockId*>(view.buf),
                   static_cast<const BlockId*>(view.buf) + view.len / 4);
        PyBuffer_Release(&view);
        return {buf.data(), buf.size()};
      }
      PyBuffer_Release(&view);
    } else {
      PyErr_Clear();
    }
  }
  buf.clear();
  size_t n = 0;
  read_ints(
      obj, what,
      [&](size_t i, long long v, bool is_unsigned) {
        if (is_unsigned || v < 0 || v >= capacity) {
          throw kvttl::UnknownBlock(kvttl::detail::cat(
              what, ": block id ", is_unsigned ? std::to_string((unsigned long long)v) : std::to_string(v),
              " (position ", i, ") is outside [0, ", capacity, ")"));
        }
        if (buf.size() <= i) buf.resize(i + 1);
        buf[i] = static_cast<BlockId>(v);
      },
      &n);
  buf.resize(n);
  return {buf.data(), buf.size()};
}

std::vector<BlockId> to_vector(kvttl::IdSpan span) { return {span.begin(), span.end()}; }

// Hashes: any integer in [-2^63, 2^64) (Python's hash() is signed; a
// negative value is taken modulo 2^64).
kvttl::HashSpan parse_hashes(nb::handle obj, std::vector<BlockHash>& buf, const char* what) {
  buf.clear();
  size_t n = 0;
  read_ints(
      obj, what,
      [&](size_t i, long long v, bool) {
        if (buf.size() <= i) buf.resize(i + 1);
        buf[i] = static_cast<BlockHash>(v);
      },
      &n);
  buf.resize(n);
  return {buf.data(), buf.size()};
}

// A str argument as UTF-8, or BadArgument naming it (a lone surrogate has none).
std::string utf8(nb::handle h, const char* what) {
  KVTTL_CHECK(PyUnicode_Check(h.ptr()), BadArgument, what, " must be a str, got ", type_name(h.ptr()));
  Py_ssize_t size;
  const char* s = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
  if (!s) {
    PyErr_Clear();
    throw BadArgument(kvttl::detail::cat(what, ": string is not valid UTF-8"));
  }
  return std::string(s, static_cast<size_t>(size));
}

kvttl::Owner parse_owner(nb::handle h) {
  PyObject* o = h.ptr();
  if (PyUnicode_Check(o)) return utf8(h, "owner");
  if (PyLong_Check(o) && !PyBool_Check(o)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    KVTTL_CHECK(overflow == 0, BadArgument, "owner: integer owner ids must fit in 64 bits");
    return static_cast<int64_t>(v);
  }
  throw BadArgument(kvttl::detail::cat("owner must be a str or an int (a program id), got ",
                                       type_name(o)));
}

// A conversion buffer, reused across calls on one thread so a call does not
// allocate. Converting an argument can run Python code (__index__,
// __float__) that calls kvttl again on the same thread; such a nested call
// finds the shared buffer taken and gets one of its own, so it can never
// overwrite ids the outer call has read but not yet used.
template <typename T>
class Scratch {
 public:
  Scratch() : shared_(!busy_) { busy_ = true; }
  ~Scratch() {
    if (shared_) busy_ = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  std::vector<T>& get() { return shared_ ? shared_buf_ : own_; }

 private:
  static thread_local std::vector<T> shared_buf_;
  static thread_local bool busy_;
  bool shared_;
  std::vector<T> own_;
};
template <typename T>
thread_local std::vector<T> Scratch<T>::shared_buf_;
template <typename T>
thread_local bool Scratch<T>::busy_ = false;
using IdScratch = Scratch<BlockId>;
using HashScratch = Scratch<BlockHash>;


double to_seconds(nb::handle h, const char* what) {
  PyObject* o = h.ptr();
  KVTTL_CHECK(!PyBool_Check(o), BadArgument, what, ": expected a number, got bool");
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw BadArgument(kvttl::detail::cat(what, ": expected a number, got ", type_name(o)));
  }
  return v;
}

int64_t to_int(nb::handle h, const char* what) {
  long long v;
  unsigned long long u;
  bool is_unsigned;
  KVTTL_CHECK(read_int(h.ptr(), &v, &u, &is_unsigned, what), BadArgument, what,
              ": expected an integer, got ", type_name(h.ptr()));
  KVTTL_CHECK(!is_unsigned, BadArgument, what, ": ", int_text(h.ptr()), " does not fit in a signed 64-bit integer");
  return v;
}

kvttl::RevokeOrder parse_order(const std::string& name) {
  if (name == "latest_granted") return kvttl::RevokeOrder::kLatestGranted;
  if (name == "earliest_deadline") return kvttl::RevokeOrder::kEarliestDeadline;
  if (name == "lowest_priority") return kvttl::RevokeOrder::kLowestPriority;
  if (name == "most_blocks") return kvttl::RevokeOrder::kMostBlocks;
  throw BadArgument("revoke: unknown order '" + name +
                    "'; known: latest_granted, earliest_deadline, lowest_priority, most_blocks");
}

// ---- swap ---------------------------------------------------------------------

kvttl::swap::LayerView parse_layer(nb::handle obj, size_t index, int want_device, int* device_id) {
  nb::ndarray<> arr;
  KVTTL_CHECK(nb::try_cast(obj, arr, false), BadArgument, "swap: layer ", index, " is a ", type_name(obj.ptr()),
              "; expected a tensor or array (DLPack, __cuda_array_interface__ or the buffer protocol)");
  const int device = arr.device_type();
  KVTTL_CHECK(device == want_device, BadArgument, "swap: layer ", index, " lives on device type ", device,
              want_device == nb::device::cuda::value ? " but the cuda backend needs CUDA tensors"
                                                     : " but the cpu backend needs host (CPU) arrays");
  if (index == 0) *device_id = arr.device_id();
  KVTTL_CHECK(arr.device_id() == *device_id, BadArgument, "swap: layer ", index, " is on device ",
              arr.device_id(), ", layer 0 on device ", *device_id);
  KVTTL_CHECK(arr.ndim() >= 1, BadArgument, "swap: layer ", index, " must have a block dimension first");
  const int64_t item = arr.dtype().bits / 8;
  KVTTL_CHECK(item >= 1 && arr.dtype().bits % 8 == 0, BadArgument, "swap: layer ", index,
              " has a sub-byte dtype");
  int64_t expected = 1;
  for (size_t d = arr.ndim(); d-- > 1;) {
    KVTTL_CHECK(arr.shape(d) == 1 || arr.stride(d) == expected, BadArgument, "swap: layer ", index,
                ": each block's page must be contiguous (dimension ", d, " has stride ", arr.stride(d),
                ", expected ", expected, ")");
    expected *= static_cast<int64_t>(arr.shape(d));
  }
  kvttl::swap::LayerView v;
  v.base = static_cast<uint8_t*>(arr.data());
  v.num_blocks = static_cast<int64_t>(arr.shape(0));
  v.page_bytes = expected * item;
  v.row_stride = arr.shape(0) == 1 ? v.page_bytes : arr.stride(0) * item;
  return v;
}

// kvttl::swap::SwapEngine with the Python objects its layer views point into.
// Members are destroyed in reverse order: the engine drains its queue before
// the tensors can go. `layers` is the bindings' own list, not the caller's,
// so clearing the caller's list frees nothing the engine reads.
struct PySwapEngine {
  nb::list layers;
  std::unique_ptr<kvttl::swap::SwapEngine> engine;

  PySwapEngine(nb::list copy, kvttl::swap::HostBuffer& host, int64_t num_slots, const std::string& backend,
               int max_ctas, int offload_max_ctas)
      : layers(std::move(copy)) {
    KVTTL_CHECK(backend == "cuda" || backend == "cpu", BadArgument, "swap: backend must be cpu or cuda, got '",
                backend, "'");
    const bool cuda = backend == "cuda";
    const int want = cuda ? nb::device::cuda::value : nb::device::cpu::value;
    int device = 0;
    std::vector<kvttl::swap::LayerView> views;
    for (size_t i = 0; i < nb::len(layers); ++i) views.push_back(parse_layer(layers[i], i, want, &device));
    engine = std::make_unique<kvttl::swap::SwapEngine>(
        std::move(views), host, num_slots, cuda ? kvttl::swap::Backend::kCuda : kvttl::swap::Backend::kCpu,
        device, max_ctas, offload_max_ctas);
  }

  std::shared_ptr<kvttl::swap::Transfer> submit(nb::handle src, nb::handle dst, const std::string& direction,
                                                const std::string& method, uintptr_t stream, uintptr_t wait_stream) {
    using kvttl::swap::Direction;
    using kvttl::swap::Method;
    const Direction dir = direction == "to_host"     ? Direction::kToHost
                          : direction == "to_device" ? Direction::kToDevice
                          : direction == "device"    ? Direction::kDeviceToDevice
                                                     : throw BadArgument("swap: unknown direction '" + direction + "'");
    const Method m = method == "kernel"    ? Method::kKernel
                     : method == "batched" ? Method::kBatchedMemcpy
                     : method == "loop"    ? Method::kLoop
                                           : throw BadArgument("swap: unknown method '" + method +
                                                               "'; known: kernel, batched, loop");
    IdScratch scratch;
    std::vector<BlockId> s = to_vector(parse_ids(src, scratch.get(), INT32_MAX, "swap: source ids"));
    std::vector<BlockId> d = to_vector(parse_ids(dst, scratch.get(), INT32_MAX, "swap: destination ids"));
    KVTTL_CHECK(s.size() == d.size(), BadArgument, "swap: ", s.size(), " source ids but ", d.size(),
                " destination ids");
    std::vector<kvttl::swap::Pair> pairs(s.size());
    for (size_t i = 0; i < s.size(); ++i) pairs[i] = {s[i], d[i]};
    return engine->submit(std::move(pairs), dir, m, stream, wait_stream);
  }

  std::vector<int64_t> page_bytes() const {
    std::vector<int64_t> out;
    for (const auto& v : engine->layout().layers) out.push_back(v.page_bytes);
    return out;
  }
};

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "kvttl native core: BlockPool and LeaseTable (see kvttl.core for the Python API).";

  // ---- errors: C++ types onto kvttl.errors -----------------------------------
  nb::module_ errors = nb::module_::import_("kvttl.errors");
  static PyObject* bad_argument = errors.attr("BadArgumentError").inc_ref().ptr();
  static PyObject* unknown_block = errors.attr("UnknownBlockError").inc_ref().ptr();
  static PyObject* double_free = errors.attr("DoubleFreeError").inc_ref().ptr();
  static PyObject* out_of_blocks = errors.attr("OutOfBlocksError").inc_ref().ptr();
  static PyObject* internal = errors.attr("InternalError").inc_ref().ptr();
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const kvttl::BadArgument& e) {
      PyErr_SetString(bad_argument, e.what());
    } catch (const kvttl::UnknownBlock& e) {
      PyErr_SetString(unknown_block, e.what());
    } catch (const kvttl::DoubleFree& e) {
      PyErr_SetString(double_free, e.what());
    } catch (const kvttl::OutOfBlocks& e) {
      PyErr_SetString(out_of_blocks, e.what());
    } catch (const kvttl::Error& e) {
      PyErr_SetString(internal, e.what());
    }
  });

  // ---- build info ------------------------------------------------------------
  m.def("build_info", []() {
    nb::dict d;
#ifdef KVTTL_WITH_CUDA
    d["cuda"] = true;
    d["cuda_runtime_version"] = kvttl::cuda::runtime_version_built();
#else
    d["cuda"] = false;
    d["cuda_runtime_version"] = nb::none();
#endif
#ifdef KVTTL_DEBUG_CHECKS
    d["debug_checks"] = true;
#else
    d["debug_checks"] = false;
#endif
#ifdef KVTTL_SANITIZE
    d["sanitizers"] = KVTTL_SANITIZE;
#else
    d["sanitizers"] = nb::none();
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  });

  m.def("cuda_probe", []() {
    nb::dict d;
#ifdef KVTTL_WITH_CUDA
    std::string error;
    const int n = kvttl::cuda::device_count(&error);
    d["num_devices"] = n;
    d["error"] = error.empty() ? nb::none() : nb::cast(error);
#else
    d["num_devices"] = 0;
    d["error"] = "kvttl was built without CUDA (KVTTL_CUDA=OFF or no CUDA toolkit found)";
#endif
    return d;
  });

  // ---- result types ------------------------------------------------------------
  nb::class_<kvttl::LeaseInfo>(m, "LeaseInfo")
      .def_ro("lease_id", &kvttl::LeaseInfo::lease_id)
      .def_ro("owner", &kvttl::LeaseInfo::owner)
      .def_ro("granted_at", &kvttl::LeaseInfo::granted_at)
      .def_ro("deadline", &kvttl::LeaseInfo::deadline)
      .def_ro("num_blocks", &kvttl::LeaseInfo::num_blocks)
      .def_ro("tool", &kvttl::LeaseInfo::tool)
      .def_ro("num_tokens", &kvttl::LeaseInfo::num_tokens)
      .def_ro("priority", &kvttl::LeaseInfo::priority)
      .def_ro("num_blocks_freed", &kvttl::LeaseInfo::num_blocks_freed)
      .def("__repr__", [](const kvttl::LeaseInfo& l) {
        std::string owner = std::holds_alternative<std::string>(l.owner)
                                ? "'" + std::get<std::string>(l.owner) + "'"
                                : std::to_string(std::get<int64_t>(l.owner));
        return kvttl::detail::cat("LeaseInfo(lease_id=", l.lease_id, ", owner=", owner,
                                  ", num_blocks=", l.num_blocks, ", granted_at=", l.granted_at,
                                  ", deadline=", l.deadline, ", tool='", l.tool, "')");
      });

  nb::class_<kvttl::GrantResult>(m, "GrantResult")
      .def_prop_ro("granted",
                   [](const kvttl::GrantResult& g) { return g.status == kvttl::GrantStatus::kGranted; })
      .def_ro("lease_id", &kvttl::GrantResult::lease_id)
      .def_ro("deadline", &kvttl::GrantResult::deadline)
      .def_prop_ro("replaced_lease_id",
                   [](const kvttl::GrantResult& g) -> nb::object {
                     return g.replaced_lease_id ? nb::cast(g.replaced_lease_id) : nb::none();
                   })
      .def_ro("reason", &kvttl::GrantResult::reason)
      .def("__bool__", [](const kvttl::GrantResult& g) { return g.status == kvttl::GrantStatus::kGranted; })
      .def("__repr__", [](const kvttl::GrantResult& g) {
        return g.status == kvttl::GrantStatus::kGranted
                   ? kvttl::detail::cat("GrantResult(granted=True, lease_id=", g.lease_id,
                                        ", deadline=", g.deadline, ")")
                   : "GrantResult(granted=False, reason='" + g.reason + "')";
      });

  nb::class_<kvttl::RevokeResult>(m, "RevokeResult")
      .def_ro("revoked", &kvttl::RevokeResult::revoked)
      .def_ro("num_blocks_freed", &kvttl::RevokeResult::num_blocks_freed)
      .def_prop_ro("num_revoked", [](const kvttl::RevokeResult& r) { return r.revoked.size(); })
      .def("__repr__", [](const kvttl::RevokeResult& r) {
        return kvttl::detail::cat("RevokeResult(num_revoked=", r.revoked.size(),
                                  ", num_blocks_freed=", r.num_blocks_freed, ")");
      });

  // ---- BlockIds ------------------------------------------------------------------
  nb::class_<BlockIds>(m, "BlockIds", nb::type_slots(block_ids_slots),
                       "Immutable int32 block ids. Supports len, indexing, slicing, iteration, "
                       "the buffer protocol (np.asarray(ids) is zero-copy) and tolist().")
      .def("__init__",
           [](BlockIds* self, nb::handle ids) {
             IdScratch scratch;
             new (self) BlockIds(to_vector(parse_ids(ids, scratch.get(), INT32_MAX, "BlockIds")));
           },
           "ids"_a.none())
      .def("__len__", [](const BlockIds& b) { return b.ids.size(); })
      .def("__getitem__",
           [](const BlockIds& b, Py_ssize_t i) {
             const Py_ssize_t n = b.shape;
             if (i < 0) i += n;
             if (i < 0 || i >= n) throw nb::index_error("BlockIds index out of range");
             return b.ids[static_cast<size_t>(i)];
           })
      .def("__getitem__",
           [](const BlockIds& b, nb::slice slice) {
             auto [start, stop, step, length] = slice.compute(b.ids.size());
             std::vector<BlockId> out(length);
             for (size_t k = 0; k < length; ++k) out[k] = b.ids[static_cast<size_t>(start + static_cast<Py_ssize_t>(k) * step)];
             (void)stop;
             return BlockIds(std::move(out));
           })
      .def("tolist", [](const BlockIds& b) {
        nb::list out;
        for (BlockId id : b.ids) out.append(id);
        return out;
      })
      .def("__iter__", [](nb::handle self) {
        return nb::iter(self.attr("tolist")());
      })
      .def("__eq__", [](const BlockIds& a, nb::handle other) -> nb::object {
        BlockIds* b = nullptr;
        if (nb::try_cast<BlockIds*>(other, b, false) && b) return nb::bool_(a.ids == b->ids);
        if (PyList_Check(other.ptr()) || PyTuple_Check(other.ptr())) {
          std::vector<BlockId> v;
          try {
            IdScratch scratch;
            v = to_vector(parse_ids(other, scratch.get(), INT32_MAX, "BlockIds"));
          } catch (const kvttl::Error&) {
            return nb::bool_(false);
          }
          return nb::bool_(a.ids == v);
        }
        return nb::borrow(Py_NotImplemented);
      })
      .def("__repr__", [](const BlockIds& b) {
        std::string s = "BlockIds([";
        for (size_t i = 0; i < b.ids.size(); ++i) s += (i ? ", " : "") + std::to_string(b.ids[i]);
        return s + "])";
      });

  // ---- pin targets ---------------------------------------------------------------
  nb::class_<kvttl::PinTarget>(m, "PinTarget")
      .def_prop_ro("capacity", &kvttl::PinTarget::capacity)
      .def_prop_ro("num_pinned", &kvttl::PinTarget::num_pinned)
      .def("pin_count", [](const kvttl::PinTarget& p, nb::handle id) { return p.pin_count(to_int(id, "pin_count")); },
           "id"_a.none());

  nb::class_<kvttl::EngineBlocks, kvttl::PinTarget>(m, "EngineBlocks")
      .def("__init__",
           [](kvttl::EngineBlocks* p, nb::handle num_blocks) {
             new (p) kvttl::EngineBlocks(to_int(num_blocks, "EngineBlocks: num_blocks"));
           },
           "num_blocks"_a.none())
      .def("check_invariants", &kvttl::EngineBlocks::check_invariants);

  // ---- BlockPool -----------------------------------------------------------------
  nb::class_<kvttl::BlockPool, kvttl::PinTarget>(m, "BlockPool")
      .def("__init__",
           [](kvttl::BlockPool* p, nb::handle num_blocks) {
             new (p) kvttl::BlockPool(to_int(num_blocks, "BlockPool: num_blocks"));
           },
           "num_blocks"_a.none())
      .def("allocate",
           [](kvttl::BlockPool& p, nb::handle n_obj) -> nb::object {
             const int64_t n = to_int(n_obj, "allocate");
             if (n < 0) throw BadArgument(kvttl::detail::cat("allocate: n must be >= 0, got ", n));
             if (n > p.capacity())
               throw kvttl::OutOfBlocks(kvttl::detail::cat("allocate: asked for ", n,
                                                           " blocks but the pool has only ",
                                                           p.capacity(), " in all"));
             std::vector<BlockId> ids(static_cast<size_t>(n));
             if (!p.allocate(n, ids.data())) return nb::none();
             return make_ids(std::move(ids));
           },
           "n"_a.none())
      .def("add_ref",
           [](kvttl::BlockPool& p, nb::handle ids) {
             IdScratch scratch;
             p.add_ref(parse_ids(ids, scratch.get(), p.capacity(), "add_ref"));
           },
           "ids"_a.none())
      .def("drop_ref",
           [](kvttl::BlockPool& p, nb::handle ids) {
             IdScratch scratch;
             return p.drop_ref(parse_ids(ids, scratch.get(), p.capacity(), "drop_ref"));
           },
           "ids"_a.none())
      .def("register_hashes",
           [](kvttl::BlockPool& p, nb::handle ids, nb::handle hashes) {
             IdScratch id_scratch;
             HashScratch hash_scratch;
             auto id_span = parse_ids(ids, id_scratch.get(), p.capacity(), "register_hashes");
             return p.register_hashes(id_span, parse_hashes(hashes, hash_scratch.get(), "register_hashes"));
           },
           "ids"_a.none(), "hashes"_a.none())
      .def("lookup_prefix",
           [](const kvttl::BlockPool& p, nb::handle hashes) {
             HashScratch scratch;
             auto span = parse_hashes(hashes, scratch.get(), "lookup_prefix");
             std::vector<BlockId> ids(span.size);
             ids.resize(p.lookup_prefix(span, ids.data()));
             return make_ids(std::move(ids));
           },
           "hashes"_a.none())
      .def("acquire_prefix",
           [](kvttl::BlockPool& p, nb::handle hashes) {
             HashScratch scratch;
             auto span = parse_hashes(hashes, scratch.get(), "acquire_prefix");
             std::vector<BlockId> ids(span.size);
             ids.resize(p.acquire_prefix(span, ids.data()));
             return make_ids(std::move(ids));
           },
           "hashes"_a.none())
      .def("evict",
           [](kvttl::BlockPool& p, nb::handle ids) {
             IdScratch scratch;
             return p.evict(parse_ids(ids, scratch.get(), p.capacity(), "evict"));
           },
           "ids"_a.none())
      .def_prop_ro("num_free", &kvttl::BlockPool::num_free)
      .def_prop_ro("num_cached", &kvttl::BlockPool::num_cached)
      .def_prop_ro("num_referenced", &kvttl::BlockPool::num_referenced)
      .def_prop_ro("num_evictable", &kvttl::BlockPool::num_evictable)
      .def("ref_count", [](const kvttl::BlockPool& p, nb::handle id) { return p.ref_count(to_int(id, "ref_count")); }, "id"_a.none())
      .def("block_hash",
           [](const kvttl::BlockPool& p, nb::handle id) -> nb::object {
             BlockHash h;
             return p.block_hash(to_int(id, "block_hash"), &h) ? nb::cast(h) : nb::none();
           },
           "id"_a.none())
      .def("queue_order", &kvttl::BlockPool::queue_order)
      .def("check_invariants", &kvttl::BlockPool::check_invariants);

  // ---- LeaseTable ----------------------------------------------------------------
  nb::class_<kvttl::LeaseTable>(m, "LeaseTable")
      .def("__init__",
           [](kvttl::LeaseTable* t, kvttl::PinTarget& target, nb::handle cap) {
             new (t) kvttl::LeaseTable(target, to_seconds(cap, "LeaseTable: pinned_share_cap"));
           },
           "target"_a, "pinned_share_cap"_a.none(), nb::keep_alive<1, 2>())
      .def("grant",
           [](kvttl::LeaseTable& t, nb::handle owner, nb::handle blocks, nb::handle now,
              nb::handle ttl, nb::handle tool, nb::handle num_tokens, nb::handle priority) {
             // Converted in a fixed order so the first bad argument is the one reported.
             // Converted in a fixed order so the first bad argument is the one
             // reported; the ids last, so no other conversion runs between
             // reading them and using them.
             const auto o = parse_owner(owner);
             const double now_s = to_seconds(now, "grant: now");
             const double ttl_s = to_seconds(ttl, "grant: ttl");
             const int64_t tokens = to_int(num_tokens, "grant: num_tokens");
             const double prio = to_seconds(priority, "grant: priority");
             const std::string tool_name = utf8(tool, "grant: tool");
             IdScratch scratch;
             const auto ids = parse_ids(blocks, scratch.get(), t.target().capacity(), "grant");
             return t.grant(o, ids, now_s, ttl_s, tool_name, tokens, prio);
           },
           "owner"_a.none(), "blocks"_a.none(), "now"_a.none(), "ttl"_a.none(), "tool"_a.none(), "num_tokens"_a.none(),
           "priority"_a.none())
      .def("release",
           [](kvttl::LeaseTable& t, nb::handle owner, uint64_t lease_id) -> nb::object {
             kvttl::LeaseInfo info;
             if (!t.release(parse_owner(owner), lease_id, &info)) return nb::none();
             return nb::cast(std::move(info));
           },
           "owner"_a.none(), "lease_id"_a)
      .def("expire",
           [](kvttl::LeaseTable& t, nb::handle now) {
             const double now_s = to_seconds(now, "expire");
             std::vector<kvttl::LeaseInfo> out;
             {
               nb::gil_scoped_release unlocked;
               out = t.expire(now_s);
             }
             return out;
           },
           "now"_a.none())
      .def("renew",
           [](kvttl::LeaseTable& t, nb::handle owner, nb::handle now, nb::handle ttl) {
             return t.renew(parse_owner(owner), to_seconds(now, "renew"), to_seconds(ttl, "renew: ttl"));
           },
           "owner"_a.none(), "now"_a.none(), "ttl"_a.none())
      .def("extend",
           [](kvttl::LeaseTable& t, nb::handle owner, nb::handle seconds) {
             return t.extend(parse_owner(owner), to_seconds(seconds, "extend: seconds"));
           },
           "owner"_a.none(), "seconds"_a.none())
      .def("demote",
           [](kvttl::LeaseTable& t, nb::handle owner, nb::handle now, nb::handle ttl,
              nb::handle keep_blocks) -> nb::object {
             int64_t freed = 0;
             if (!t.demote(parse_owner(owner), to_seconds(now, "demote"), to_seconds(ttl, "demote: ttl"),
                           to_int(keep_blocks, "demote: keep_blocks"), &freed))
               return nb::none();
             return nb::cast(freed);
           },
           "owner"_a.none(), "now"_a.none(), "ttl"_a.none(), "keep_blocks"_a.none())
      .def("revoke",
           [](kvttl::LeaseTable& t, nb::handle num_blocks, nb::handle num_leases, nb::handle order) {
             const auto o = parse_order(utf8(order, "revoke: order"));
             const int64_t n = to_int(num_blocks, "revoke: num_blocks");
             const int64_t k = to_int(num_leases, "revoke: num_leases");
             kvttl::RevokeResult r;
             {
               nb::gil_scoped_release unlocked;
               r = t.revoke(n, k, o);
             }
             return r;
           },
           "num_blocks"_a.none(), "num_leases"_a.none(), "order"_a.none())
      .def("revoke_in_order",
           [](kvttl::LeaseTable& t, nb::handle num_blocks, nb::handle num_leases,
              const std::vector<uint64_t>& lease_ids) {
             return t.revoke_in_order(to_int(num_blocks, "revoke: num_blocks"),
                                      to_int(num_leases, "revoke: num_leases"), lease_ids);
           },
           "num_blocks"_a.none(), "num_leases"_a.none(), "lease_ids"_a)
      .def("release_all", &kvttl::LeaseTable::release_all)
      .def("get",
           [](const kvttl::LeaseTable& t, nb::handle owner) -> nb::object {
             kvttl::LeaseInfo info;
             if (!t.get(parse_owner(owner), &info)) return nb::none();
             return nb::cast(std::move(info));
           },
           "owner"_a.none())
      .def("blocks",
           [](const kvttl::LeaseTable& t, nb::handle owner) {
             return make_ids(t.blocks(parse_owner(owner)));
           },
           "owner"_a.none())
      .def("leases", &kvttl::LeaseTable::leases)
      .def("older_than",
           [](const kvttl::LeaseTable& t, nb::handle now, nb::handle max_age) {
             return t.older_than(to_seconds(now, "older_than"), to_seconds(max_age, "older_than: max_age"));
           },
           "now"_a.none(), "max_age"_a.none())
      .def_prop_ro("num_leases", &kvttl::LeaseTable::num_leases)
      .def_prop_ro("pinned_share_cap", &kvttl::LeaseTable::pinned_share_cap)
      .def_prop_ro("max_pinned_blocks", &kvttl::LeaseTable::max_pinned_blocks)
      .def_prop_ro("heap_size", &kvttl::LeaseTable::heap_size)
      .def("check_invariants", &kvttl::LeaseTable::check_invariants);

  // ---- swap ------------------------------------------------------------------------
  nb::class_<kvttl::swap::HostBuffer>(m, "HostBuffer")
      .def("__init__",
           [](kvttl::swap::HostBuffer* self, nb::handle num_bytes, bool pinned) {
             new (self) kvttl::swap::HostBuffer(to_int(num_bytes, "host tier: num_bytes"), pinned);
           },
           "num_bytes"_a.none(), "pinned"_a)
      .def_prop_ro("num_bytes", &kvttl::swap::HostBuffer::num_bytes)
      .def_prop_ro("pinned", &kvttl::swap::HostBuffer::pinned)
      .def("view",
           [](nb::handle self, int64_t rows, int64_t row_bytes) {
             auto& b = nb::cast<kvttl::swap::HostBuffer&>(self);
             KVTTL_CHECK(rows >= 0 && row_bytes >= 0 && rows * row_bytes <= b.num_bytes(), BadArgument,
                         "host tier: a view of ", rows, " x ", row_bytes, " bytes does not fit in ",
                         b.num_bytes());
             return nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>(
                 b.data(), {static_cast<size_t>(rows), static_cast<size_t>(row_bytes)}, self);
           },
           "rows"_a, "row_bytes"_a);

  nb::class_<kvttl::swap::Transfer>(m, "Transfer")
      .def("done", &kvttl::swap::Transfer::done)
      .def("wait", &kvttl::swap::Transfer::wait, nb::call_guard<nb::gil_scoped_release>())
      .def_ro("num_bytes", &kvttl::swap::Transfer::num_bytes);

  nb::class_<PySwapEngine>(m, "SwapEngine")
      .def("__init__",
           [](PySwapEngine* self, nb::handle layers, kvttl::swap::HostBuffer& host, int64_t num_slots,
              const std::string& backend, int max_ctas, int offload_max_ctas) {
             KVTTL_CHECK(PyList_Check(layers.ptr()) || PyTuple_Check(layers.ptr()), BadArgument,
                         "swap: layers must be a list of tensors, got ", type_name(layers.ptr()));
             nb::list copy;
             for (nb::handle layer : layers) copy.append(layer);
             new (self) PySwapEngine(std::move(copy), host, num_slots, backend, max_ctas, offload_max_ctas);
           },
           "layers"_a, "host"_a, "num_slots"_a, "backend"_a, "max_ctas"_a, "offload_max_ctas"_a,
           nb::keep_alive<1, 3>())
      .def("submit", &PySwapEngine::submit, "src"_a.none(), "dst"_a.none(), "direction"_a, "method"_a, "stream"_a,
           "wait_stream"_a)
      .def_prop_ro("slot_bytes", [](const PySwapEngine& e) { return e.engine->layout().slot_bytes; })
      .def_prop_ro("num_blocks", [](const PySwapEngine& e) { return e.engine->layout().num_blocks(); })
      .def_prop_ro("num_slots", [](const PySwapEngine& e) { return e.engine->layout().num_slots; })
      .def_prop_ro("device", [](const PySwapEngine& e) { return e.engine->device(); })
      .def_prop_ro("page_bytes", &PySwapEngine::page_bytes);

  m.def("has_batched_memcpy", &kvttl::swap::has_batched_memcpy);
}
