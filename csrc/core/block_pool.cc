#include "kvttl/block_pool.h"

#include <algorithm>
#include <limits>

namespace kvttl {

BlockPool::BlockPool(int64_t num_blocks) : PinTarget(num_blocks) {
  blocks_.resize(static_cast<size_t>(num_blocks) + 1);
  const BlockId sentinel = static_cast<BlockId>(num_blocks);
  blocks_[sentinel].prev = blocks_[sentinel].next = sentinel;
  for (BlockId b = 0; b < sentinel; ++b) push_tail(b);
}

// ---- free queue ---------------------------------------------------------

void BlockPool::unlink(BlockId id) {
  Block& blk = blocks_[id];
  KVTTL_DCHECK(blk.prev >= 0 && blk.next >= 0);
  blocks_[blk.prev].next = blk.next;
  blocks_[blk.next].prev = blk.prev;
  blk.prev = blk.next = -1;
  --queue_size_;
  if (blk.hashed) --num_cached_;
}

void BlockPool::push_head(BlockId id) {
  const BlockId s = static_cast<BlockId>(capacity_);
  Block& blk = blocks_[id];
  blk.prev = s;
  blk.next = blocks_[s].next;
  blocks_[blk.next].prev = id;
  blocks_[s].next = id;
  ++queue_size_;
  if (blk.hashed) ++num_cached_;
}

void BlockPool::push_tail(BlockId id) {
  const BlockId s = static_cast<BlockId>(capacity_);
  Block& blk = blocks_[id];
  blk.next = s;
  blk.prev = blocks_[s].prev;
  blocks_[blk.prev].next = id;
  blocks_[s].prev = id;
  ++queue_size_;
  if (blk.hashed) ++num_cached_;
}

void BlockPool::drop_content(BlockId id) {
  Block& blk = blocks_[id];
  if (!blk.hashed) return;
  auto it = prefix_index_.find(blk.hash);
  if (it != prefix_index_.end() && it->second == id) prefix_index_.erase(it);
  blk.hashed = false;
  blk.hash = 0;
}

void BlockPool::release_one(BlockId id) {
  if (blocks_[id].hashed)
    push_tail(id);
  else
    push_head(id);
}

// ---- validation ---------------------------------------------------------

void BlockPool::check_ref_room(IdSpan ids, const char* what) const {
  for (size_t i = 0; i < ids.size; ++i) {
    KVTTL_CHECK(blocks_[ids[i]].ref < std::numeric_limits<int32_t>::max(), BadArgument, what, ": block ",
                ids[i], " already carries the most references a block can hold");
  }
}

void BlockPool::check_pinnable_locked(IdSpan ids, const char* what) const {
  check_unique(ids, what);
  check_has_content(ids, what);
}

void BlockPool::check_has_content(IdSpan ids, const char* what) const {
  for (size_t i = 0; i < ids.size; ++i) {
    const Block& blk = blocks_[ids[i]];
    KVTTL_CHECK(blk.ref > 0 || blk.hashed, UnknownBlock, what, ": block ", ids[i],
                " is free (no references, no content); only cached or referenced "
                "blocks can be referenced");
    KVTTL_CHECK(blk.ref < std::numeric_limits<int32_t>::max(), BadArgument, what, ": block ", ids[i],
                " already carries the most references a block can hold");
  }
}

// ---- public operations --------------------------------------------------

bool BlockPool::allocate(int64_t n, BlockId* out) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTTL_CHECK(n >= 0, BadArgument, "allocate: n must be >= 0, got ", n);
  KVTTL_CHECK(n <= capacity_, OutOfBlocks, "allocate: asked for ", n,
              " blocks but the pool has only ", capacity_, " in all");
  if (n > queue_size_) return false;
  // Walk the first n blocks of the queue, then splice them out at once.
  const BlockId s = static_cast<BlockId>(capacity_);
  BlockId b = blocks_[s].next;
  for (int64_t i = 0; i < n; ++i) {
    Block& blk = blocks_[b];
    const BlockId next = blk.next;
    if (blk.hashed) {
      --num_cached_;
      drop_content(b);
    }
    blk.ref = 1;
    blk.prev = blk.next = -1;
    out[i] = b;
    b = next;
  }
  blocks_[s].next = b;
  blocks_[b].prev = s;
  queue_size_ -= n;
  return true;
}

void BlockPool::add_ref_locked(IdSpan ids) {
  for (BlockId b : ids) {
    Block& blk = blocks_[b];
    if (blk.ref == 0) unlink(b);
    ++blk.ref;
  }
}

void BlockPool::add_ref(IdSpan ids) {
  std::lock_guard<std::mutex> lock(mu_);
  check_unique(ids, "add_ref");
  check_has_content(ids, "add_ref");
  add_ref_locked(ids);
}

int64_t BlockPool::drop_ref(IdSpan ids) {
  std::lock_guard<std::mutex> lock(mu_);
  check_range(ids, "drop_ref");
  // One pass stamps for duplicates and notes the first block without an
  // engine reference; duplicates are reported first, as in check_unique.
  const uint32_t epoch = next_epoch();
  size_t bad = ids.size;
  for (size_t i = 0; i < ids.size; ++i) {
    const BlockId b = ids[i];
    KVTTL_CHECK(seen_[b] != epoch, BadArgument, "drop_ref: block id ", b,
                " appears more than once in one call (position ", i, ")");
    seen_[b] = epoch;
    if (bad == ids.size && blocks_[b].ref - blocks_[b].pins <= 0) bad = i;
  }
  if (bad != ids.size) {
    const Block& blk = blocks_[ids[bad]];
    throw DoubleFree(detail::cat(
        "drop_ref: block ", ids[bad],
        blk.ref == 0 ? " is not referenced"
                     : " has no engine reference left (all its references are held by leases)",
        " (position ", bad, ")"));
  }
  int64_t released = 0;
  for (BlockId b : ids) {
    if (--blocks_[b].ref == 0) {
      release_one(b);
      ++released;
    }
  }
  return released;
}

int64_t BlockPool::register_hashes(IdSpan ids, HashSpan hashes) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTTL_CHECK(ids.size == hashes.size, BadArgument, "register_hashes: got ", ids.size,
              " block ids but ", hashes.size, " hashes");
  check_unique(ids, "register_hashes");
  for (size_t i = 0; i < ids.size; ++i) {
    const Block& blk = blocks_[ids[i]];
    KVTTL_CHECK(blk.ref > 0, BadArgument, "register_hashes: block ", ids[i],
                " is not referenced; hold a reference while registering its content");
    KVTTL_CHECK(!blk.hashed, BadArgument, "register_hashes: block ", ids[i],
                " already holds content hash ", blk.hash);
  }
  int64_t indexed = 0;
  for (size_t i = 0; i < ids.size; ++i) {
    if (prefix_index_.emplace(hashes[i], ids[i]).second) {
      blocks_[ids[i]].hashed = true;
      blocks_[ids[i]].hash = hashes[i];
      ++indexed;
    }
  }
  return indexed;
}

size_t BlockPool::lookup_prefix_locked(HashSpan hashes, BlockId* out) const {
  // One hash names one block, so a hash repeated inside the run would hand
  // out a block twice: the run ends there instead. (A repeat is no error:
  // an index keyed by truncated hashes sees one on a truncation collision.)
  const uint32_t epoch = next_epoch();
  size_t n = 0;
  for (BlockHash h : hashes) {
    auto it = prefix_index_.find(h);
    if (it == prefix_index_.end() || seen_[it->second] == epoch) break;
    seen_[it->second] = epoch;
    out[n++] = it->second;
  }
  return n;
}

size_t BlockPool::lookup_prefix(HashSpan hashes, BlockId* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  return lookup_prefix_locked(hashes, out);
}

size_t BlockPool::acquire_prefix(HashSpan hashes, BlockId* out) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = lookup_prefix_locked(hashes, out);
  check_ref_room(IdSpan{out, n}, "acquire_prefix");
  add_ref_locked(IdSpan{out, n});  // the index holds no duplicate ids
  return n;
}

int64_t BlockPool::evict(IdSpan ids) {
  std::lock_guard<std::mutex> lock(mu_);
  check_unique(ids, "evict");
  for (size_t i = 0; i < ids.size; ++i) {
    KVTTL_CHECK(blocks_[ids[i]].ref == 0, BadArgument, "evict: block ", ids[i],
                " is referenced (ref ", blocks_[ids[i]].ref,
                "); only cached blocks can be evicted");
  }
  int64_t evicted = 0;
  for (BlockId b : ids) {
    if (!blocks_[b].hashed) continue;
    unlink(b);
    drop_content(b);
    push_head(b);
    ++evicted;
  }
  return evicted;
}

// ---- leases (mutex held by LeaseTable) ------------------------------------

void BlockPool::pin_locked(IdSpan ids) {
  for (BlockId b : ids) {
    Block& blk = blocks_[b];
    if (blk.ref == 0) unlink(b);
    ++blk.ref;
    if (blk.pins++ == 0) ++num_pinned_;
  }
}

int64_t BlockPool::unpin_locked(const BlockId* ids, size_t n) {
  int64_t released = 0;
  for (size_t i = 0; i < n; ++i) {
    Block& blk = blocks_[ids[i]];
    KVTTL_INVARIANT(blk.pins > 0 && blk.ref >= blk.pins);
    if (--blk.pins == 0) --num_pinned_;
    if (--blk.ref == 0) {
      release_one(ids[i]);
      ++released;
    }
  }
  return released;
}

// ---- queries -------------------------------------------------------------

int64_t BlockPool::num_free() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_size_ - num_cached_;
}
int64_t BlockPool::num_cached() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_cached_;
}
int64_t BlockPool::num_referenced() const {
  std::lock_guard<std::mutex> lock(mu_);
  return capacity_ - queue_size_;
}
int64_t BlockPool::num_evictable() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_size_;
}
int32_t BlockPool::ref_count(int64_t id) const {
  KVTTL_CHECK(id >= 0 && id < capacity_, UnknownBlock, "ref_count: block id ", id,
              " is outside [0, ", capacity_, ")");
  std::lock_guard<std::mutex> lock(mu_);
  return blocks_[id].ref;
}

bool BlockPool::block_hash(int64_t id, BlockHash* out) const {
  KVTTL_CHECK(id >= 0 && id < capacity_, UnknownBlock, "block_hash: block id ", id,
              " is outside [0, ", capacity_, ")");
  std::lock_guard<std::mutex> lock(mu_);
  if (!blocks_[id].hashed) return false;
  *out = blocks_[id].hash;
  return true;
}

std::vector<BlockId> BlockPool::queue_order() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<BlockId> order;
  order.reserve(static_cast<size_t>(queue_size_));
  const BlockId s = static_cast<BlockId>(capacity_);
  for (BlockId b = blocks_[s].next; b != s; b = blocks_[b].next) order.push_back(b);
  return order;
}

void BlockPool::check_invariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  const BlockId s = static_cast<BlockId>(capacity_);
  int64_t in_queue = 0, cached = 0, pinned = 0;
  for (BlockId b = blocks_[s].next, prev = s; b != s; prev = b, b = blocks_[b].next) {
    KVTTL_INVARIANT(b >= 0 && b < s);
    KVTTL_INVARIANT(blocks_[b].prev == prev);
    KVTTL_INVARIANT(blocks_[b].ref == 0);
    ++in_queue;
    KVTTL_INVARIANT(in_queue <= capacity_);
    if (blocks_[b].hashed) ++cached;
  }
  KVTTL_INVARIANT(in_queue == queue_size_);
  KVTTL_INVARIANT(cached == num_cached_);
  int64_t hashed = 0;
  for (BlockId b = 0; b < s; ++b) {
    const Block& blk = blocks_[b];
    KVTTL_INVARIANT(blk.pins >= 0 && blk.ref >= blk.pins);
    KVTTL_INVARIANT((blk.ref == 0) == (blk.prev >= 0));
    if (blk.pins > 0) ++pinned;
    if (blk.hashed) {
      ++hashed;
      auto it = prefix_index_.find(blk.hash);
      KVTTL_INVARIANT(it != prefix_index_.end() && it->second == b);
    }
  }
  KVTTL_INVARIANT(hashed == static_cast<int64_t>(prefix_index_.size()));
  KVTTL_INVARIANT(pinned == num_pinned_);
}

}  // namespace kvttl
