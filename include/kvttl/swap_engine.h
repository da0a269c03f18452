// HostBuffer: the host memory of a host tier. SwapEngine: validates block
// transfers between an engine's layer tensors and a HostBuffer, and runs them
// on the CPU queue or the CUDA backend. Neither knows Python: the bindings
// turn tensors into LayerViews and ids into Pairs, then call these.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvttl/swap.h"

namespace kvttl::cuda {
class CudaSwap;
}

namespace kvttl::swap {

// Page-aligned ordinary memory, or mapped pinned memory (cudaHostAlloc) that
// the CUDA backend's kernels address directly; pinned needs a CUDA build.
class HostBuffer {
 public:
  HostBuffer(int64_t num_bytes, bool pinned);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  uint8_t* data() const { return data_; }
  int64_t num_bytes() const { return num_bytes_; }
  bool pinned() const { return pinned_; }

 private:
  uint8_t* data_ = nullptr;
  int64_t num_bytes_;
  bool pinned_;
};

enum class Backend { kCpu, kCuda };

// Why one object per engine: the layout (per-layer bases, page sizes, slot
// offsets) is checked once, and on CUDA copied to the device once, so every
// transfer after that is one validation pass and one launch.
//
// The layer memory is borrowed: whoever owns the tensors keeps them alive
// for as long as the engine (the bindings hold the Python objects).
class SwapEngine {
 public:
  // device: the CUDA device of the layers (ignored on the CPU backend).
  SwapEngine(std::vector<LayerView> layers, HostBuffer& host, int64_t num_slots, Backend backend,
             int device, int max_ctas, int offload_max_ctas);
  ~SwapEngine();  // drains the CPU queue before the layout can go
  SwapEngine(const SwapEngine&) = delete;
  SwapEngine& operator=(const SwapEngine&) = delete;

  // Validates the whole batch, then enqueues it; a bad batch copies nothing.
  // stream / wait_stream are CUDA streams (0 on the CPU backend).
  std::shared_ptr<Transfer> submit(std::vector<Pair> pairs, Direction dir, Method method, uintptr_t stream,
                                   uintptr_t wait_stream);

  const Layout& layout() const { return layout_; }
  Backend backend() const { return backend_; }
  int device() const { return device_; }

 private:
  Backend backend_;
  int device_;
  Layout layout_;
  std::unique_ptr<CpuQueue> cpu_;
  std::unique_ptr<cuda::CudaSwap> gpu_;
};

// Whether this build has cudaMemcpyBatchAsync (CUDA 12.8+); false without CUDA.
bool has_batched_memcpy();

}  // namespace kvttl::swap
