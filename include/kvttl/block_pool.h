// BlockPool: fixed-size KV block ids of one memory tier, with reference
// counts, an eviction-ordered free queue and a content-hash prefix index.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "kvttl/pin_target.h"

namespace kvttl {

// Every block is in exactly one of three states:
//
//   free        ref == 0, no hash    holds nothing; handed out first
//   cached      ref == 0, hash set   holds registered content; evictable
//   referenced  ref >= 1             in use by the engine and/or pinned by leases
//
// Why this structure. The free queue is an intrusive doubly-linked list
// threaded through the block array (prev/next are block ids; index
// num_blocks is the sentinel). Unlike a deque or a vector it removes a
// block from the middle in O(1) -- needed when a prefix hit revives a cached
// block -- and it never allocates: the links live in the block records.
// Free and cached blocks share one queue so that allocation is a single pop
// from the head:
//
//   head -> [free, most recently released first] -> [cached, LRU .. MRU] <- tail
//
// A released block with a hash goes to the tail (it is the most recently
// used content, evicted last); one without a hash goes to the head (it holds
// nothing worth keeping, so it is reused first). This is vLLM's order.
// Allocation pops from the head and, when it pops a cached block, removes it
// from the prefix index: that is eviction.
//
// The prefix index maps a content hash to the one block that holds it. A
// second block registered under a hash that is already indexed keeps no hash
// (duplicate content is not cached twice) and is freed as plain free space.
//
// `pins` counts the references held by leases (see LeaseTable). It is kept
// here so drop_ref can refuse to take a reference that a lease owns:
// ref - pins is the engine's share.
//
// Thread safety: every public method takes the pool's mutex, so each call is
// atomic; LeaseTable takes the same mutex, so a lease operation is atomic
// with respect to the pool too.
class BlockPool final : public PinTarget {
 public:
  explicit BlockPool(int64_t num_blocks);

  // Takes n blocks from the head of the free queue (evicting cached blocks
  // once free ones run out), each with ref 1, written to out[0..n).
  // Returns false, changing nothing, when fewer than n are free or cached.
  // Throws OutOfBlocks when n exceeds the capacity: that can never succeed.
  bool allocate(int64_t n, BlockId* out);

  // One more reference on each block (a prefix hit). Blocks must be cached or
  // referenced; a cached block leaves the free queue.
  void add_ref(IdSpan ids);

  // One engine reference fewer on each block. A block whose ref reaches 0
  // joins the free queue: a hashed one at the cached tail, in the order
  // given (the first of the batch is evicted first; engines that want a
  // request's tail evicted before its prefix pass the ids in reverse); an
  // unhashed one at the head, so of those the last given is handed out
  // first. Returns how many blocks became free or cached.
  int64_t drop_ref(IdSpan ids);

  // Registers full blocks' content hashes. Each block must be referenced and
  // hold no hash yet. A hash already indexed to another block is skipped.
  // Returns how many blocks were indexed.
  int64_t register_hashes(IdSpan ids, HashSpan hashes);

  // Longest run of blocks, from the first hash on, whose content is cached or
  // referenced; a hash repeated in the run ends it (no block comes back
  // twice). Writes the ids to out (room for hashes.size) and returns the
  // count. Changes nothing.
  size_t lookup_prefix(HashSpan hashes, BlockId* out) const;

  // lookup_prefix and add_ref on the result under one lock.
  size_t acquire_prefix(HashSpan hashes, BlockId* out);

  // Drops the content of cached blocks (they become free). Free blocks are
  // left as they are; a referenced block is an error. Returns the number of
  // blocks whose content was dropped.
  int64_t evict(IdSpan ids);

  int64_t num_free() const;
  int64_t num_cached() const;
  int64_t num_referenced() const;
  int64_t num_evictable() const;  // free + cached: what allocate can take
  int32_t ref_count(int64_t id) const;
  bool block_hash(int64_t id, BlockHash* out) const;

  // Free queue from head to tail (for tests and debugging; O(capacity)).
  std::vector<BlockId> queue_order() const;

  // Checks every structural invariant; throws Error on the first violation.
  // O(capacity); for tests.
  void check_invariants() const;

 protected:
  void check_pinnable_locked(IdSpan ids, const char* what) const override;
  int32_t pins_locked(BlockId id) const override { return blocks_[static_cast<size_t>(id)].pins; }
  int64_t pinned_after_locked(IdSpan add, IdSpan remove) const override {
    return count_pinned_after(add, remove, [this](BlockId b) { return blocks_[static_cast<size_t>(b)].pins; });
  }
  void pin_locked(IdSpan ids) override;
  int64_t unpin_locked(const BlockId* ids, size_t n) override;

 private:
  struct Block {
    int32_t ref = 0;
    int32_t pins = 0;
    BlockId prev = -1;
    BlockId next = -1;
    BlockHash hash = 0;
    bool hashed = false;
  };

  // Each block holds content (is cached or referenced) and has room for one
  // more reference (int32).
  void check_has_content(IdSpan ids, const char* what) const;
  void check_ref_room(IdSpan ids, const char* what) const;
  void unlink(BlockId id);
  void push_head(BlockId id);
  void push_tail(BlockId id);
  void drop_content(BlockId id);
  void release_one(BlockId id);  // ref reached 0: into the queue
  size_t lookup_prefix_locked(HashSpan hashes, BlockId* out) const;
  void add_ref_locked(IdSpan ids);

  std::vector<Block> blocks_;  // capacity_ + 1: the last is the queue sentinel
  int64_t queue_size_ = 0;
  int64_t num_cached_ = 0;
  std::unordered_map<BlockHash, BlockId> prefix_index_;
};

}  // namespace kvttl
