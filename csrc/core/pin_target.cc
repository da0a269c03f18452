#include "kvttl/pin_target.h"

#include <algorithm>

namespace kvttl {

PinTarget::PinTarget(int64_t capacity) : capacity_(capacity) {
  KVTTL_CHECK(capacity >= 1 && capacity <= kMaxBlocks, BadArgument, "num_blocks must be between 1 and ",
              kMaxBlocks, ", got ", capacity);
  seen_.assign(static_cast<size_t>(capacity), 0);
}

int64_t PinTarget::num_pinned() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_pinned_;
}

int32_t PinTarget::pin_count(int64_t id) const {
  KVTTL_CHECK(id >= 0 && id < capacity_, UnknownBlock, "pin_count: block id ", id, " is outside [0, ",
              capacity_, ")");
  std::lock_guard<std::mutex> lock(mu_);
  return pins_locked(static_cast<BlockId>(id));
}

uint32_t PinTarget::next_epoch() const {
  if (++epoch_ == 0) {  // wrapped: clear stale stamps once every 2^32 calls
    std::fill(seen_.begin(), seen_.end(), 0);
    epoch_ = 1;
  }
  return epoch_;
}

void PinTarget::check_range(IdSpan ids, const char* what) const {
  for (size_t i = 0; i < ids.size; ++i) {
    KVTTL_CHECK(ids[i] >= 0 && ids[i] < capacity_, UnknownBlock, what, ": block id ", ids[i], " (position ", i,
                ") is outside [0, ", capacity_, ")");
  }
}

void PinTarget::check_unique(IdSpan ids, const char* what) const {
  check_range(ids, what);
  const uint32_t epoch = next_epoch();
  for (size_t i = 0; i < ids.size; ++i) {
    const BlockId b = ids[i];
    KVTTL_CHECK(seen_[b] != epoch, BadArgument, what, ": block id ", b,
                " appears more than once in one call (position ", i, ")");
    seen_[b] = epoch;
  }
}

// ---- EngineBlocks ---------------------------------------------------------------

EngineBlocks::EngineBlocks(int64_t num_blocks) : PinTarget(num_blocks) {
  pins_.assign(static_cast<size_t>(num_blocks), 0);
}

void EngineBlocks::check_pinnable_locked(IdSpan ids, const char* what) const {
  check_unique(ids, what);
  for (size_t i = 0; i < ids.size; ++i) {
    KVTTL_CHECK(pins_[static_cast<size_t>(ids[i])] < std::numeric_limits<int32_t>::max(), BadArgument, what,
                ": block ", ids[i], " already carries the most pins a block can hold");
  }
}

void EngineBlocks::pin_locked(IdSpan ids) {
  for (BlockId b : ids) {
    if (pins_[static_cast<size_t>(b)]++ == 0) ++num_pinned_;
  }
}

int64_t EngineBlocks::unpin_locked(const BlockId* ids, size_t n) {
  int64_t unpinned = 0;
  for (size_t i = 0; i < n; ++i) {
    int32_t& pins = pins_[static_cast<size_t>(ids[i])];
    KVTTL_INVARIANT(pins > 0);
    if (--pins == 0) {
      --num_pinned_;
      ++unpinned;
    }
  }
  return unpinned;
}

void EngineBlocks::check_invariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t pinned = 0;
  for (int32_t pins : pins_) {
    KVTTL_INVARIANT(pins >= 0);
    pinned += pins > 0;
  }
  KVTTL_INVARIANT(pinned == num_pinned_);
}

}  // namespace kvttl
