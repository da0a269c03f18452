// Block transfers between an engine's per-layer KV tensors and a host tier.
//
// Device side: one tensor per layer, each viewed as (num_blocks, page_bytes)
// rows (row stride may exceed the page: padded layouts are fine). Host side:
// slots in a block-first layout -- slot s holds block data for every layer,
// layer l at byte offset slot_offset[l] -- so one block's pages are contiguous
// on the host and a slot is one contiguous run of slot_bytes.
//
// Every transfer is validated whole before anything is copied: a bad id,
// a duplicate destination or an overlapping device-to-device pair rejects the
// whole batch, so there is never a partial copy.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvttl/errors.h"

namespace kvttl::swap {

struct LayerView {
  uint8_t* base = nullptr;
  int64_t num_blocks = 0;
  int64_t page_bytes = 0;
  int64_t row_stride = 0;  // bytes between consecutive blocks
};

struct Layout {
  std::vector<LayerView> layers;
  std::vector<int64_t> slot_offset;  // per layer, within a host slot
  uint8_t* host = nullptr;
  int64_t num_slots = 0;
  int64_t slot_bytes = 0;

  // Checks the layer views against each other and builds slot offsets
  // (packed in layer order); host may be set afterwards.
  static Layout make(std::vector<LayerView> layers);
  int64_t num_blocks() const { return layers.empty() ? 0 : layers[0].num_blocks; }
};

enum class Direction { kToHost, kToDevice, kDeviceToDevice };

// How the CUDA backend moves a batch: one gather/scatter kernel, one
// cudaMemcpyBatchAsync, or a cudaMemcpyAsync per fragment (vLLM's swap_blocks).
enum class Method { kKernel, kBatchedMemcpy, kLoop };

struct Pair {
  int32_t src;
  int32_t dst;
};

// Validates a batch for `dir` against `layout`. Throws UnknownBlock for an id
// out of range, BadArgument for a duplicate destination or, device to device,
// an id that is both read and written.
void validate(const Layout& layout, const std::vector<Pair>& pairs, Direction dir);

// The plain copy, on the calling thread.
void copy_cpu(const Layout& layout, const std::vector<Pair>& pairs, Direction dir);

// An in-flight transfer. done() polls; wait() blocks and throws the error the
// transfer ended with, if any.
class Transfer {
 public:
  virtual ~Transfer() = default;
  virtual bool done() = 0;
  virtual void wait() = 0;
  int64_t num_bytes = 0;
};

// Runs copies on one worker thread, in submission order (the CPU backend's
// "stream").
//
// Why a single worker and a FIFO: a transfer's handle promises ordering with
// the transfers submitted before it, exactly like a CUDA stream, so the
// host can issue offload-then-reload sequences without waiting in between.
class CpuQueue {
 public:
  CpuQueue();
  ~CpuQueue();  // drains the queue: nothing submitted is lost
  std::shared_ptr<Transfer> submit(std::function<void()> job, int64_t num_bytes);

 private:
  struct Job;
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<void()>, std::shared_ptr<Job>>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace kvttl::swap
