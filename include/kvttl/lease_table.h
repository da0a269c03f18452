// LeaseTable: time-limited, owner-keyed, revocable pins on BlockPool blocks.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "kvttl/pin_target.h"

namespace kvttl {

// A lease's owner: the program (agent session) it belongs to.
using Owner = std::variant<int64_t, std::string>;

struct LeaseInfo {
  uint64_t lease_id = 0;
  Owner owner;
  double granted_at = 0;
  double deadline = 0;
  int64_t num_blocks = 0;
  std::string tool;
  int64_t num_tokens = 0;
  double priority = 0;
  // Set by expire / revoke / release: blocks that became free or cached.
  int64_t num_blocks_freed = 0;
};

enum class GrantStatus { kGranted, kRefusedCap };

struct GrantResult {
  GrantStatus status = GrantStatus::kGranted;
  uint64_t lease_id = 0;           // 0 when refused
  double deadline = 0;
  uint64_t replaced_lease_id = 0;  // the owner's previous lease, 0 if none
  std::string reason;              // why refused; empty when granted
};

struct RevokeResult {
  std::vector<LeaseInfo> revoked;
  int64_t num_blocks_freed = 0;
};

enum class RevokeOrder {
  kLatestGranted,    // newest lease first (Continuum: unpin the latest-arriving program)
  kEarliestDeadline, // the lease closest to expiring first
  kLowestPriority,   // lowest priority first, newest first among equals
  kMostBlocks,       // the biggest lease first
};

// Why this structure. Leases live in a hash map keyed by lease id, with a
// second map owner -> lease id, because every call names one owner (grant,
// release, renew) and an owner holds at most one lease at a time. Deadlines
// sit in a binary min-heap with lazy deletion: release, renew and demote do
// not search the heap, they only change the lease; expire pops entries whose
// deadline is due and skips those that no longer match a live lease's
// current deadline. expire therefore costs O(k log n) for k due entries.
// Stale entries are compacted away when they outnumber live leases, which
// keeps the heap O(live leases) and the amortised cost per operation O(log n).
// Lease ids grow monotonically, so "latest granted" is "highest id".
//
// A lease holds one pin on each of its blocks. Over a BlockPool a pin is a
// reference, so a leased block is neither allocatable nor evictable whatever
// the engine does with its own references; over EngineBlocks the engine holds
// the memory and the pins are counted (see PinTarget). A block may be covered
// by several leases.
//
// Time is never read here: every call that needs it takes `now` (seconds on
// the caller's clock). The Python layer injects the clock.
//
// Thread safety: every method takes the target's mutex; each call is atomic.
// One table per target: a second would count the first one's pins as its own.
class LeaseTable {
 public:
  // pinned_share_cap: the largest fraction of the target's blocks that
  // leases may pin, in [0, 1].
  LeaseTable(PinTarget& target, double pinned_share_cap);
  ~LeaseTable();
  LeaseTable(const LeaseTable&) = delete;
  LeaseTable& operator=(const LeaseTable&) = delete;

  // Pins `blocks` for `owner` until now + ttl (ttl may be +inf). Over a
  // BlockPool the blocks must be cached or referenced. An existing lease of the same owner is replaced:
  // the new references are taken before the old ones are dropped. A grant
  // that would pin more than the cap allows is refused and changes nothing.
  GrantResult grant(const Owner& owner, IdSpan blocks, double now, double ttl,
                    const std::string& tool, int64_t num_tokens, double priority);

  // Drops the owner's lease. If lease_id is non-zero, only that lease (a
  // stale id -- the lease was replaced or has ended -- releases nothing).
  // Returns false when there was nothing to release: a normal race.
  bool release(const Owner& owner, uint64_t lease_id, LeaseInfo* released);

  // Every lease whose deadline is <= now, each exactly once, in (deadline,
  // grant) order.
  std::vector<LeaseInfo> expire(double now);

  // deadline = now + ttl. Returns false if the owner holds no lease.
  bool renew(const Owner& owner, double now, double ttl);
  // deadline += seconds (seconds >= 0).
  bool extend(const Owner& owner, double seconds);
  // Shortens: deadline = min(deadline, now + ttl); keep_blocks >= 1 also
  // unpins all but the first keep_blocks blocks (a newer turn superseded the
  // tail). keep_blocks < 0 keeps them all.
  bool demote(const Owner& owner, double now, double ttl, int64_t keep_blocks,
              int64_t* blocks_freed);

  // Revokes leases in `order` until at least num_blocks blocks were freed
  // (became free or cached in a BlockPool; pinned by no lease any more in
  // EngineBlocks), max_leases leases were revoked, or none is left. A lease
  // whose blocks are all still held elsewhere is revoked too and frees
  // nothing.
  RevokeResult revoke(int64_t num_blocks, int64_t max_leases, RevokeOrder order);
  // The same with the caller's order: lease ids, unknown ones skipped.
  RevokeResult revoke_in_order(int64_t num_blocks, int64_t max_leases,
                               const std::vector<uint64_t>& lease_ids);

  // Drops every lease (engine shutdown), in grant order. Returns how many.
  int64_t release_all();

  bool get(const Owner& owner, LeaseInfo* out) const;
  std::vector<BlockId> blocks(const Owner& owner) const;  // empty if none
  std::vector<LeaseInfo> leases() const;
  // Leases granted more than max_age seconds before now: leak suspects.
  std::vector<LeaseInfo> older_than(double now, double max_age) const;

  int64_t num_leases() const;
  const PinTarget& target() const { return target_; }
  double pinned_share_cap() const { return cap_; }
  int64_t max_pinned_blocks() const { return max_pinned_; }
  size_t heap_size() const;  // for tests of the lazy deletion

  void check_invariants() const;

 private:
  struct Lease {
    LeaseInfo info;
    std::vector<BlockId> blocks;
  };
  struct HeapEntry {
    double deadline;
    uint64_t lease_id;
  };

  static bool later(const HeapEntry& a, const HeapEntry& b);  // min-heap on deadline
  Lease* find_locked(const Owner& owner);
  const Lease* find_locked(const Owner& owner) const;
  void push_deadline(const Lease& lease);
  LeaseInfo end_locked(uint64_t lease_id);  // unpins and erases
  RevokeResult revoke_locked(int64_t num_blocks, int64_t max_leases,
                             const std::vector<uint64_t>& order);
  void maybe_compact_heap();

  PinTarget& target_;
  double cap_;
  int64_t max_pinned_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, Lease> leases_;
  std::unordered_map<Owner, uint64_t> by_owner_;
  std::vector<HeapEntry> heap_;
};

}  // namespace kvttl
