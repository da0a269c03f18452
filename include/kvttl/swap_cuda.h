// CUDA backend of kvttl::swap: one kernel launch per batch (gather to host
// slots, scatter from them, or device-to-device), a batched-memcpy path and
// the per-fragment cudaMemcpyAsync loop (what vLLM's swap_blocks does).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvttl/swap.h"

struct CUstream_st;

namespace kvttl::cuda {

using Method = swap::Method;

// Mapped, portable pinned host memory (device-addressable under UVA).
void* host_alloc_pinned(size_t bytes);
void host_free_pinned(void* p) noexcept;

// Whether this build has cudaMemcpyBatchAsync (CUDA 12.8+).
bool has_batched_memcpy();

class CudaSwap {
 public:
  // layout.host must be device-addressable (pinned, mapped). The caps bound
  // the kernel's grid so a transfer leaves SMs to the engine's compute:
  // offload_max_ctas for copies to the host (off the critical path, and the
  // ones that slow a GEMM beside them most), max_ctas for the others.
  CudaSwap(const swap::Layout& layout, int device, int max_ctas, int offload_max_ctas);
  ~CudaSwap();
  CudaSwap(const CudaSwap&) = delete;
  CudaSwap& operator=(const CudaSwap&) = delete;

  // Enqueues on `stream` (0: the legacy default stream) after everything
  // already enqueued there and, if wait_stream != 0, after that stream's
  // current work. Pairs must be validated.
  std::shared_ptr<swap::Transfer> submit(const std::vector<swap::Pair>& pairs, swap::Direction dir,
                                         Method method, uintptr_t stream, uintptr_t wait_stream);

 private:
  swap::Layout layout_;
  int device_;
  int max_ctas_;
  int offload_max_ctas_;
  uint64_t* d_bases_ = nullptr;
  int64_t* d_pages_ = nullptr;
  int64_t* d_strides_ = nullptr;
  int64_t* d_offsets_ = nullptr;
  // Where batched copies run when the caller names the legacy default stream; made on first use.
  struct CUstream_st* side_ = nullptr;  // a cudaStream_t, without the CUDA headers here
};

}  // namespace kvttl::cuda
