// PinTarget: the block ids a LeaseTable pins, with a count of lease pins on
// each; EngineBlocks: the PinTarget for memory that an engine owns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "kvttl/errors.h"

namespace kvttl {

using BlockId = int32_t;
using BlockHash = uint64_t;

// A borrowed, read-only run of values (C++17 has no std::span).
template <typename T>
struct Span {
  const T* data = nullptr;
  size_t size = 0;
  const T* begin() const { return data; }
  const T* end() const { return data + size; }
  const T& operator[](size_t i) const { return data[i]; }
};
using IdSpan = Span<BlockId>;
using HashSpan = Span<BlockHash>;

class LeaseTable;

// Block ids [0, capacity) and the number of lease pins on each. There are two
// kinds, and a LeaseTable works the same over either:
//
//   BlockPool     kvttl owns the memory: a pin is a real reference, so a
//                 pinned block is neither allocatable nor evictable.
//   EngineBlocks  the engine owns the memory (vLLM's block pool, SGLang's
//                 radix tree) and keeps its own hold on pinned blocks; kvttl
//                 counts the pins -- for the pinned-share cap, and to tell the
//                 engine which blocks no lease holds any more.
//
// Why a virtual base: a lease operation touches its whole batch of blocks in
// one call, so the virtual dispatch is paid once per batch, and the lease
// logic (owners, deadlines, the cap, replace-on-grant) exists once for both.
//
// Every public method of a target and of its LeaseTable takes mu_, so each
// call is atomic with respect to both.
class PinTarget {
 public:
  explicit PinTarget(int64_t capacity);
  virtual ~PinTarget() = default;
  PinTarget(const PinTarget&) = delete;
  PinTarget& operator=(const PinTarget&) = delete;

  int64_t capacity() const { return capacity_; }
  int64_t num_pinned() const;          // blocks at least one lease pins
  int32_t pin_count(int64_t id) const;  // lease pins on one block

 protected:
  friend class LeaseTable;
  // The rest is called with mu_ held.

  // Validates a batch that a lease would pin, changing nothing: every id in
  // range, none twice (each id is stamped with the current epoch, which
  // pinned_after_locked relies on), no count at its limit, and whatever the
  // target adds (BlockPool: the block holds content).
  virtual void check_pinnable_locked(IdSpan ids, const char* what) const = 0;
  virtual int32_t pins_locked(BlockId id) const = 0;
  virtual void pin_locked(IdSpan ids) = 0;
  // Drops one pin from each block; returns how many blocks became free or
  // cached (BlockPool) or are pinned by no lease any more (EngineBlocks).
  virtual int64_t unpin_locked(const BlockId* ids, size_t n) = 0;

  // Blocks pinned after pinning `add` (just checked, so stamped) and
  // unpinning `remove` (the lease `add` replaces). Each target runs
  // count_pinned_after with its own inline pin accessor: no virtual call per block.
  virtual int64_t pinned_after_locked(IdSpan add, IdSpan remove) const = 0;
  template <typename PinsOf>
  int64_t count_pinned_after(IdSpan add, IdSpan remove, PinsOf pins) const {
    int64_t added = 0, removed = 0;
    for (BlockId b : add) added += pins(b) == 0;
    // A block of the old lease stops being pinned if that lease was its only
    // pin and the new batch (stamped by check_pinnable_locked) does not take it.
    for (BlockId b : remove) removed += pins(b) == 1 && seen_[static_cast<size_t>(b)] != epoch_;
    return num_pinned_ + added - removed;
  }

  uint32_t next_epoch() const;
  void check_range(IdSpan ids, const char* what) const;
  // check_range, then no id twice; stamps every id. A bad id is reported
  // before a duplicate, wherever each is.
  void check_unique(IdSpan ids, const char* what) const;

  int64_t capacity_;
  int64_t num_pinned_ = 0;
  bool has_table_ = false;  // set by the one LeaseTable over this target
  // Duplicate detection without allocation: a batch call stamps each id with
  // a fresh epoch; an id already carrying the current epoch is a duplicate.
  mutable std::vector<uint32_t> seen_;
  mutable uint32_t epoch_ = 0;
  mutable std::mutex mu_;
};

// Memory that an engine allocates and frees itself, seen by kvttl as block
// ids with pin counts and nothing else: no free queue, no prefix index, no
// reference counts of the engine's. An engine that adopts kvttl without
// handing it its allocator uses this, and takes its own hold on a lease's
// blocks (vLLM: one more block reference; SGLang: a tree lock) when the
// lease is granted, dropping it when the lease ends.
class EngineBlocks final : public PinTarget {
 public:
  explicit EngineBlocks(int64_t num_blocks);
  // Throws Error if the pin counts and num_pinned disagree. O(capacity).
  void check_invariants() const;

 protected:
  void check_pinnable_locked(IdSpan ids, const char* what) const override;
  int32_t pins_locked(BlockId id) const override { return pins_[static_cast<size_t>(id)]; }
  int64_t pinned_after_locked(IdSpan add, IdSpan remove) const override {
    return count_pinned_after(add, remove, [this](BlockId b) { return pins_[static_cast<size_t>(b)]; });
  }
  void pin_locked(IdSpan ids) override;
  int64_t unpin_locked(const BlockId* ids, size_t n) override;

 private:
  std::vector<int32_t> pins_;
};

// The largest number of blocks one target may have.
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max() - 1;

}  // namespace kvttl
