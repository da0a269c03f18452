#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kvttl/swap_cuda.h"

namespace kvttl::cuda {

namespace {

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls are not poisoned
    throw Error(std::string("swap: ") + what + ": " + cudaGetErrorName(rc) + ": " + cudaGetErrorString(rc));
  }
}

// Restores the caller's current device on scope exit.
struct DeviceGuard {
  int previous = 0;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous); }
};

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kUnroll = 8;     // loads in flight per lane

// One warp copies `count` elements of V, lane-strided (coalesced). Each lane
// issues kUnroll loads before its first store: a read from pinned host memory
// is a PCIe round trip, and the link is filled only by many reads in flight.
// The tail is predicated the same way, so an 8 KiB fragment (512 x 16 B) is
// one round of loads, not a chain of dependent ones.
template <typename V>
__device__ __forceinline__ void copy_vec(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, int64_t count,
                                         int lane) {
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  int64_t i = lane;
  V r[kUnroll];
  for (; i + (kUnroll - 1) * kWarp < count; i += kUnroll * kWarp) {
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) r[k] = s[i + k * kWarp];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) d[i + k * kWarp] = r[k];
  }
#pragma unroll
  for (int k = 0; k < kUnroll; ++k)
    if (i + k * kWarp < count) r[k] = s[i + k * kWarp];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k)
    if (i + k * kWarp < count) d[i + k * kWarp] = r[k];
}

// The vector width is chosen per fragment from its own alignment.
__device__ __forceinline__ void copy_fragment(uint8_t* dst, const uint8_t* src, int64_t n, int lane) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(n);
  if ((a & 15) == 0) {
    copy_vec<uint4>(dst, src, n / 16, lane);
  } else if ((a & 7) == 0) {
    copy_vec<uint2>(dst, src, n / 8, lane);
  } else if ((a & 3) == 0) {
    copy_vec<uint32_t>(dst, src, n / 4, lane);
  } else {
    copy_vec<uint8_t>(dst, src, n, lane);
  }
}

// One work item per (pair, layer), one warp per item; warps stride over the
// items. A warp per item (not a CTA) keeps many fragments in flight on few
// SMs: the grid is capped (max_ctas, offload_max_ctas) so that a transfer
// leaves the SMs to the model's kernels.
__global__ void __launch_bounds__(kThreads)
    transfer_kernel(const uint64_t* __restrict__ bases, const int64_t* __restrict__ pages,
                    const int64_t* __restrict__ strides, const int64_t* __restrict__ offsets, int num_layers,
                    uint8_t* host, int64_t slot_bytes, const int2* __restrict__ pairs, int64_t num_items,
                    int direction) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
       item < num_items; item += warps) {
    const int64_t p = item / num_layers;
    const int layer = static_cast<int>(item % num_layers);
    const int2 pair = pairs[p];
    uint8_t* base = reinterpret_cast<uint8_t*>(bases[layer]);
    const int64_t stride = strides[layer];
    const int64_t n = pages[layer];
    switch (direction) {
      case 0:  // device -> host
        copy_fragment(host + pair.y * slot_bytes + offsets[layer], base + pair.x * stride, n, lane);
        break;
      case 1:  // host -> device
        copy_fragment(base + pair.y * stride, host + pair.x * slot_bytes + offsets[layer], n, lane);
        break;
      default:  // device -> device
        copy_fragment(base + pair.y * stride, base + pair.x * stride, n, lane);
        break;
    }
  }
}

class CudaTransfer : public swap::Transfer {
 public:
  CudaTransfer(int device, cudaEvent_t event) : device_(device), event_(event) {}
  ~CudaTransfer() override {
    if (event_) {
      cudaEventSynchronize(event_);  // never free what the copy may still use
      cudaEventDestroy(event_);
    }
  }
  bool done() override {
    const cudaError_t rc = cudaEventQuery(event_);
    if (rc == cudaErrorNotReady) return false;
    check(rc, "transfer");
    return true;
  }
  void wait() override {
    DeviceGuard guard(device_);
    check(cudaEventSynchronize(event_), "transfer");
  }

 private:
  int device_;
  cudaEvent_t event_;
};

// Makes the work enqueued on `to` from now on wait for what is enqueued on `from` so far.
void order(cudaStream_t from, cudaStream_t to) {
  cudaEvent_t ready = nullptr;
  check(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
  const cudaError_t recorded = cudaEventRecord(ready, from);
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(to, ready, 0) : recorded;
  cudaEventDestroy(ready);  // released once the wait is satisfied
  check(waited, "cudaStreamWaitEvent");
}

bool is_legacy_stream(cudaStream_t s) { return s == nullptr || s == cudaStreamLegacy; }

int direction_code(swap::Direction dir) {
  return dir == swap::Direction::kToHost ? 0 : dir == swap::Direction::kToDevice ? 1 : 2;
}

}  // namespace

void* host_alloc_pinned(size_t bytes) {
  void* p = nullptr;
  check(cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
  return p;
}

void host_free_pinned(void* p) noexcept { cudaFreeHost(p); }

bool has_batched_memcpy() {
#if CUDART_VERSION >= 12080
  return true;
#else
  return false;
#endif
}

CudaSwap::CudaSwap(const swap::Layout& layout, int device, int max_ctas, int offload_max_ctas)
    : layout_(layout), device_(device), max_ctas_(max_ctas), offload_max_ctas_(offload_max_ctas) {
  KVTTL_CHECK(max_ctas >= 1, BadArgument, "swap: max_ctas must be >= 1, got ", max_ctas);
  KVTTL_CHECK(offload_max_ctas >= 1, BadArgument, "swap: offload_max_ctas must be >= 1, got ", offload_max_ctas);
  DeviceGuard guard(device_);
  const size_t n = layout_.layers.size();
  std::vector<uint64_t> bases(n);
  std::vector<int64_t> pages(n), strides(n);
  for (size_t l = 0; l < n; ++l) {
    bases[l] = reinterpret_cast<uint64_t>(layout_.layers[l].base);
    pages[l] = layout_.layers[l].page_bytes;
    strides[l] = layout_.layers[l].row_stride;
  }
  check(cudaMalloc(&d_bases_, n * sizeof(uint64_t)), "cudaMalloc");
  check(cudaMalloc(&d_pages_, n * sizeof(int64_t)), "cudaMalloc");
  check(cudaMalloc(&d_strides_, n * sizeof(int64_t)), "cudaMalloc");
  check(cudaMalloc(&d_offsets_, n * sizeof(int64_t)), "cudaMalloc");
  check(cudaMemcpy(d_bases_, bases.data(), n * sizeof(uint64_t), cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(d_pages_, pages.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(d_strides_, strides.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(d_offsets_, layout_.slot_offset.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice),
        "cudaMemcpy");
}

CudaSwap::~CudaSwap() {
  if (side_ != nullptr) cudaStreamDestroy(side_);  // returns at once; released once its work is done
  cudaFree(d_bases_);
  cudaFree(d_pages_);
  cudaFree(d_strides_);
  cudaFree(d_offsets_);
}

std::shared_ptr<swap::Transfer> CudaSwap::submit(const std::vector<swap::Pair>& pairs, swap::Direction dir,
                                                 Method method, uintptr_t stream_handle, uintptr_t wait_stream) {
  DeviceGuard guard(device_);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
  auto transfer = std::make_shared<CudaTransfer>(device_, event);
  if (wait_stream != 0) order(reinterpret_cast<cudaStream_t>(wait_stream), stream);
  const size_t L = layout_.layers.size();
  for (size_t l = 0; l < L; ++l) transfer->num_bytes += static_cast<int64_t>(pairs.size()) * layout_.layers[l].page_bytes;

  if (!pairs.empty() && method == Method::kKernel) {
    int2* d_pairs = nullptr;
    const size_t bytes = pairs.size() * sizeof(int2);
    check(cudaMallocAsync(reinterpret_cast<void**>(&d_pairs), bytes, stream), "cudaMallocAsync");
    // A pageable source is staged before cudaMemcpyAsync returns: `pairs` may go.
    check(cudaMemcpyAsync(d_pairs, pairs.data(), bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    const int64_t items = static_cast<int64_t>(pairs.size() * L);
    const int64_t warps_per_cta = kThreads / kWarp;
    const int cap = dir == swap::Direction::kToHost ? offload_max_ctas_ : max_ctas_;
    const int grid = static_cast<int>(std::min<int64_t>((items + warps_per_cta - 1) / warps_per_cta, cap));
    transfer_kernel<<<grid, kThreads, 0, stream>>>(d_bases_, d_pages_, d_strides_, d_offsets_,
                                                   static_cast<int>(L), layout_.host, layout_.slot_bytes, d_pairs,
                                                   items, direction_code(dir));
    check(cudaGetLastError(), "transfer kernel launch");
    check(cudaFreeAsync(d_pairs, stream), "cudaFreeAsync");
  } else if (!pairs.empty()) {
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
    dsts.reserve(pairs.size() * L);
    for (const swap::Pair& p : pairs) {
      for (size_t l = 0; l < L; ++l) {
        const swap::LayerView& v = layout_.layers[l];
        uint8_t* host = layout_.host + (dir == swap::Direction::kToHost ? p.dst : p.src) * layout_.slot_bytes +
                        layout_.slot_offset[l];
        uint8_t* src = dir == swap::Direction::kToDevice ? host : v.base + p.src * v.row_stride;
        uint8_t* dst = dir == swap::Direction::kToHost ? host : v.base + p.dst * v.row_stride;
        dsts.push_back(dst);
        srcs.push_back(src);
        sizes.push_back(static_cast<size_t>(v.page_bytes));
      }
    }
    if (method == Method::kBatchedMemcpy) {
#if CUDART_VERSION >= 12080
      cudaMemcpyAttributes attr = {};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      size_t attr_index = 0;
      // cudaMemcpyBatchAsync refuses the legacy default stream (invalid argument): there the
      // batch runs on this engine's own stream, after the legacy stream's work and before what
      // is enqueued on it next.
      cudaStream_t on = stream;
      if (is_legacy_stream(stream)) {
        if (side_ == nullptr) check(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "cudaStreamCreate");
        on = side_;
        order(stream, on);
      }
#if CUDART_VERSION >= 13000
      check(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_index, 1, on),
            "cudaMemcpyBatchAsync");
#else
      size_t fail_index = 0;
      check(cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), dsts.size(), &attr,
                                 &attr_index, 1, &fail_index, on),
            "cudaMemcpyBatchAsync");
#endif
      if (on != stream) order(on, stream);
#else
      throw BadArgument("swap: this build's CUDA runtime has no cudaMemcpyBatchAsync (needs 12.8)");
#endif
    } else {
      for (size_t i = 0; i < dsts.size(); ++i)
        check(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream), "cudaMemcpyAsync");
    }
  }
  check(cudaEventRecord(event, stream), "cudaEventRecord");
  return transfer;
}

}  // namespace kvttl::cuda
