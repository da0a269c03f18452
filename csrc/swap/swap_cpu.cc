#include <cstring>
#include <unordered_set>

#include "kvttl/swap.h"

namespace kvttl::swap {

Layout Layout::make(std::vector<LayerView> layers) {
  KVTTL_CHECK(!layers.empty(), BadArgument, "swap: need at least one layer tensor");
  Layout out;
  int64_t offset = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerView& v = layers[l];
    KVTTL_CHECK(v.base != nullptr, BadArgument, "swap: layer ", l, " has no data");
    KVTTL_CHECK(v.num_blocks == layers[0].num_blocks, BadArgument, "swap: layer ", l, " has ",
                v.num_blocks, " blocks, layer 0 has ", layers[0].num_blocks,
                "; every layer needs the same number of blocks");
    KVTTL_CHECK(v.num_blocks > 0 && v.num_blocks <= INT32_MAX, BadArgument, "swap: layer ", l,
                " has ", v.num_blocks, " blocks");
    KVTTL_CHECK(v.page_bytes > 0 && v.row_stride >= v.page_bytes, BadArgument, "swap: layer ", l,
                ": rows of ", v.page_bytes, " bytes need a row stride of at least that, got ",
                v.row_stride);
    out.slot_offset.push_back(offset);
    offset += v.page_bytes;
  }
  out.layers = std::move(layers);
  out.slot_bytes = offset;
  return out;
}

void validate(const Layout& layout, const std::vector<Pair>& pairs, Direction dir) {
  const int64_t nb = layout.num_blocks();
  const int64_t ns = layout.num_slots;
  const int64_t src_limit = dir == Direction::kToDevice ? ns : nb;
  const int64_t dst_limit = dir == Direction::kToHost ? ns : nb;
  const char* src_name = dir == Direction::kToDevice ? "host slot" : "device block";
  const char* dst_name = dir == Direction::kToHost ? "host slot" : "device block";
  std::unordered_set<int32_t> dsts;
  dsts.reserve(pairs.size() * 2);
  for (size_t i = 0; i < pairs.size(); ++i) {
    KVTTL_CHECK(pairs[i].src >= 0 && pairs[i].src < src_limit, UnknownBlock, "swap: source ", src_name,
                " ", pairs[i].src, " (pair ", i, ") is outside [0, ", src_limit, ")");
    KVTTL_CHECK(pairs[i].dst >= 0 && pairs[i].dst < dst_limit, UnknownBlock, "swap: destination ",
                dst_name, " ", pairs[i].dst, " (pair ", i, ") is outside [0, ", dst_limit, ")");
    KVTTL_CHECK(dsts.insert(pairs[i].dst).second, BadArgument, "swap: destination ", dst_name, " ",
                pairs[i].dst, " is written twice (pair ", i, ")");
  }
  if (dir == Direction::kDeviceToDevice) {
    for (size_t i = 0; i < pairs.size(); ++i) {
      KVTTL_CHECK(!dsts.count(pairs[i].src), BadArgument, "swap: device block ", pairs[i].src,
                  " is both read and written in one copy (pair ", i, ")");
    }
  }
}

void copy_cpu(const Layout& layout, const std::vector<Pair>& pairs, Direction dir) {
  for (const Pair& p : pairs) {
    for (size_t l = 0; l < layout.layers.size(); ++l) {
      const LayerView& v = layout.layers[l];
      uint8_t* host_slot = layout.host + static_cast<int64_t>(dir == Direction::kToHost ? p.dst : p.src) *
                                             layout.slot_bytes + layout.slot_offset[l];
      switch (dir) {
        case Direction::kToHost:
          std::memcpy(host_slot, v.base + p.src * v.row_stride, static_cast<size_t>(v.page_bytes));
          break;
        case Direction::kToDevice:
          std::memcpy(v.base + p.dst * v.row_stride, host_slot, static_cast<size_t>(v.page_bytes));
          break;
        case Direction::kDeviceToDevice:
          std::memcpy(v.base + p.dst * v.row_stride, v.base + p.src * v.row_stride,
                      static_cast<size_t>(v.page_bytes));
          break;
      }
    }
  }
}

// ---- the CPU queue ------------------------------------------------------------

struct CpuQueue::Job : Transfer {
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  std::string error;

  bool done() override {
    std::lock_guard<std::mutex> lock(mu);
    return finished;
  }
  void wait() override {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return finished; });
    if (!error.empty()) throw Error(error);
  }
};

CpuQueue::CpuQueue() : worker_([this] { run(); }) {}

CpuQueue::~CpuQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

std::shared_ptr<Transfer> CpuQueue::submit(std::function<void()> job, int64_t num_bytes) {
  auto state = std::make_shared<Job>();
  state->num_bytes = num_bytes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.emplace_back(std::move(job), state);
  }
  cv_.notify_one();
  return state;
}

void CpuQueue::run() {
  for (;;) {
    std::pair<std::function<void()>, std::shared_ptr<Job>> item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and drained
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    std::string error;
    try {
      item.first();
    } catch (const std::exception& e) {
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(item.second->mu);
      item.second->error = std::move(error);
      item.second->finished = true;
    }
    item.second->cv.notify_all();
  }
}

}  // namespace kvttl::swap
