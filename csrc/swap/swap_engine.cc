#include "kvttl/swap_engine.h"

#include <climits>
#include <cstdlib>

#ifdef KVTTL_WITH_CUDA
#include "kvttl/swap_cuda.h"
#else
namespace kvttl::cuda {
class CudaSwap {};  // never made without CUDA; complete, so unique_ptr can destroy it
}  // namespace kvttl::cuda
#endif

namespace kvttl::swap {

HostBuffer::HostBuffer(int64_t num_bytes, bool pinned) : num_bytes_(num_bytes), pinned_(pinned) {
  KVTTL_CHECK(num_bytes > 0, BadArgument, "host tier: size must be > 0 bytes, got ", num_bytes);
  if (pinned) {
#ifdef KVTTL_WITH_CUDA
    data_ = static_cast<uint8_t*>(cuda::host_alloc_pinned(static_cast<size_t>(num_bytes)));
#else
    throw BadArgument("host tier: pinned memory needs a CUDA build of kvttl (this one was built without CUDA)");
#endif
  } else {
    const size_t rounded = (static_cast<size_t>(num_bytes) + 4095) / 4096 * 4096;
    data_ = static_cast<uint8_t*>(std::aligned_alloc(4096, rounded));
    KVTTL_CHECK(data_ != nullptr, OutOfBlocks, "host tier: could not allocate ", num_bytes, " bytes");
  }
}

HostBuffer::~HostBuffer() {
#ifdef KVTTL_WITH_CUDA
  if (pinned_) {
    cuda::host_free_pinned(data_);
    return;
  }
#endif
  std::free(data_);
}

SwapEngine::SwapEngine(std::vector<LayerView> layers, HostBuffer& host, int64_t num_slots, Backend backend,
                       int device, int max_ctas, int offload_max_ctas)
    : backend_(backend), device_(device) {
#ifndef KVTTL_WITH_CUDA
  KVTTL_CHECK(backend != Backend::kCuda, BadArgument,
              "swap: the cuda backend needs a CUDA build of kvttl (built without CUDA)");
#endif
  KVTTL_CHECK(backend != Backend::kCuda || host.pinned(), BadArgument,
              "swap: the cuda backend needs a pinned host tier");
  layout_ = Layout::make(std::move(layers));
  KVTTL_CHECK(num_slots >= 1 && num_slots <= INT32_MAX, BadArgument, "swap: num_slots must be >= 1, got ",
              num_slots);
  KVTTL_CHECK(num_slots * layout_.slot_bytes <= host.num_bytes(), BadArgument, "swap: ", num_slots,
              " slots of ", layout_.slot_bytes, " bytes need ", num_slots * layout_.slot_bytes,
              " bytes; the host buffer has ", host.num_bytes());
  KVTTL_CHECK(max_ctas >= 1, BadArgument, "swap: max_ctas must be >= 1, got ", max_ctas);
  KVTTL_CHECK(offload_max_ctas >= 1, BadArgument, "swap: offload_max_ctas must be >= 1, got ", offload_max_ctas);
  layout_.host = host.data();
  layout_.num_slots = num_slots;
  if (backend == Backend::kCuda) {
#ifdef KVTTL_WITH_CUDA
    gpu_ = std::make_unique<cuda::CudaSwap>(layout_, device_, max_ctas, offload_max_ctas);
#endif
  } else {
    cpu_ = std::make_unique<CpuQueue>();
  }
}

SwapEngine::~SwapEngine() = default;

std::shared_ptr<Transfer> SwapEngine::submit(std::vector<Pair> pairs, Direction dir, Method method,
                                             uintptr_t stream, uintptr_t wait_stream) {
  validate(layout_, pairs, dir);
  int64_t bytes = 0;
  for (const auto& v : layout_.layers) bytes += v.page_bytes * static_cast<int64_t>(pairs.size());
  if (backend_ == Backend::kCpu) {
    KVTTL_CHECK(stream == 0 && wait_stream == 0, BadArgument, "swap: the cpu backend takes no CUDA streams");
    const Layout layout = layout_;
    return cpu_->submit([layout, pairs = std::move(pairs), dir] { copy_cpu(layout, pairs, dir); }, bytes);
  }
#ifdef KVTTL_WITH_CUDA
  return gpu_->submit(pairs, dir, method, stream, wait_stream);
#else
  (void)method;
  throw BadArgument("swap: built without CUDA");
#endif
}

bool has_batched_memcpy() {
#ifdef KVTTL_WITH_CUDA
  return cuda::has_batched_memcpy();
#else
  return false;
#endif
}

}  // namespace kvttl::swap
