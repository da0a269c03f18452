#include "kvttl/lease_table.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <unordered_set>

namespace kvttl {

namespace {

void check_now(double now, const char* what) {
  KVTTL_CHECK(std::isfinite(now), BadArgument, what, ": now must be a finite time, got ", now);
}

void check_ttl(double ttl, const char* what) {
  KVTTL_CHECK(!std::isnan(ttl) && ttl >= 0, BadArgument, what,
              ": ttl must be >= 0 seconds (inf for no deadline), got ", ttl);
}

}  // namespace

LeaseTable::LeaseTable(PinTarget& target, double pinned_share_cap) : target_(target) {
  KVTTL_CHECK(!std::isnan(pinned_share_cap) && pinned_share_cap >= 0 && pinned_share_cap <= 1,
              BadArgument, "pinned_share_cap must be in [0, 1], got ", pinned_share_cap);
  std::lock_guard<std::mutex> lock(target_.mu_);
  KVTTL_CHECK(!target_.has_table_, BadArgument,
              "LeaseTable: these blocks already have a lease table; one table per pool keeps the "
              "pinned-share cap and the pin counts its own");
  target_.has_table_ = true;
  cap_ = pinned_share_cap;
  max_pinned_ = static_cast<int64_t>(std::floor(cap_ * static_cast<double>(target.capacity())));
}

// A table that goes away returns its pins: nothing stays referenced for a lease
// that no longer exists.
LeaseTable::~LeaseTable() {
  release_all();
  std::lock_guard<std::mutex> lock(target_.mu_);
  target_.has_table_ = false;
}

// Equal deadlines expire in grant order, so expiry is deterministic.
bool LeaseTable::later(const HeapEntry& a, const HeapEntry& b) {
  return a.deadline != b.deadline ? a.deadline > b.deadline : a.lease_id > b.lease_id;
}

LeaseTable::Lease* LeaseTable::find_locked(const Owner& owner) {
  auto it = by_owner_.find(owner);
  return it == by_owner_.end() ? nullptr : &leases_.at(it->second);
}

const LeaseTable::Lease* LeaseTable::find_locked(const Owner& owner) const {
  auto it = by_owner_.find(owner);
  return it == by_owner_.end() ? nullptr : &leases_.at(it->second);
}

void LeaseTable::push_deadline(const Lease& lease) {
  if (std::isinf(lease.info.deadline)) return;  // never due
  heap_.push_back({lease.info.deadline, lease.info.lease_id});
  std::push_heap(heap_.begin(), heap_.end(), later);
}

void LeaseTable::maybe_compact_heap() {
  if (heap_.size() <= 2 * leases_.size() + 64) return;
  heap_.clear();
  for (const auto& [id, lease] : leases_)
    if (!std::isinf(lease.info.deadline)) heap_.push_back({lease.info.deadline, id});
  std::make_heap(heap_.begin(), heap_.end(), later);
}

LeaseInfo LeaseTable::end_locked(uint64_t lease_id) {
  auto it = leases_.find(lease_id);
  KVTTL_INVARIANT(it != leases_.end());
  LeaseInfo info = std::move(it->second.info);
  info.num_blocks_freed =
      target_.unpin_locked(it->second.blocks.data(), it->second.blocks.size());
  by_owner_.erase(info.owner);
  leases_.erase(it);
  return info;
}

GrantResult LeaseTable::grant(const Owner& owner, IdSpan blocks, double now, double ttl,
                              const std::string& tool, int64_t num_tokens, double priority) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  check_now(now, "grant");
  check_ttl(ttl, "grant");
  KVTTL_CHECK(num_tokens >= 0, BadArgument, "grant: num_tokens must be >= 0, got ", num_tokens);
  KVTTL_CHECK(std::isfinite(priority), BadArgument, "grant: priority must be finite, got ",
              priority);
  KVTTL_CHECK(blocks.size > 0, BadArgument, "grant: a lease needs at least one block");
  target_.check_pinnable_locked(blocks, "grant");

  Lease* old = find_locked(owner);
  const int64_t pinned_after = target_.pinned_after_locked(
      blocks, old ? IdSpan{old->blocks.data(), old->blocks.size()} : IdSpan{});
  GrantResult result;
  if (pinned_after > max_pinned_) {
    result.status = GrantStatus::kRefusedCap;
    result.reason = detail::cat("pinned-share cap: the grant would pin ", pinned_after, " of ",
                                target_.capacity(), " blocks; the cap of ", cap_, " allows ",
                                max_pinned_);
    return result;
  }

  target_.pin_locked(blocks);  // new pins first ...
  if (old) {
    result.replaced_lease_id = old->info.lease_id;
    end_locked(old->info.lease_id);  // ... then the old ones go
  }
  Lease lease;
  lease.info.lease_id = next_id_++;
  lease.info.owner = owner;
  lease.info.granted_at = now;
  lease.info.deadline = now + ttl;
  lease.info.num_blocks = static_cast<int64_t>(blocks.size);
  lease.info.tool = tool;
  lease.info.num_tokens = num_tokens;
  lease.info.priority = priority;
  lease.blocks.assign(blocks.begin(), blocks.end());
  result.lease_id = lease.info.lease_id;
  result.deadline = lease.info.deadline;
  by_owner_[owner] = lease.info.lease_id;
  push_deadline(lease);
  leases_.emplace(lease.info.lease_id, std::move(lease));
  maybe_compact_heap();
  return result;
}

bool LeaseTable::release(const Owner& owner, uint64_t lease_id, LeaseInfo* released) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  Lease* lease = find_locked(owner);
  if (!lease || (lease_id != 0 && lease->info.lease_id != lease_id)) return false;
  LeaseInfo info = end_locked(lease->info.lease_id);
  if (released) *released = std::move(info);
  maybe_compact_heap();
  return true;
}

std::vector<LeaseInfo> LeaseTable::expire(double now) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  KVTTL_CHECK(!std::isnan(now), BadArgument, "expire: now must not be NaN");
  std::vector<LeaseInfo> expired;
  while (!heap_.empty() && heap_.front().deadline <= now) {
    const HeapEntry due = heap_.front();
    std::pop_heap(heap_.begin(), heap_.end(), later);
    heap_.pop_back();
    auto it = leases_.find(due.lease_id);
    if (it == leases_.end() || it->second.info.deadline != due.deadline) continue;  // stale
    expired.push_back(end_locked(due.lease_id));
  }
  maybe_compact_heap();
  return expired;
}

bool LeaseTable::renew(const Owner& owner, double now, double ttl) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  check_now(now, "renew");
  check_ttl(ttl, "renew");
  Lease* lease = find_locked(owner);
  if (!lease) return false;
  if (lease->info.deadline != now + ttl) {
    lease->info.deadline = now + ttl;
    push_deadline(*lease);
    maybe_compact_heap();
  }
  return true;
}

bool LeaseTable::extend(const Owner& owner, double seconds) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  KVTTL_CHECK(!std::isnan(seconds) && seconds >= 0, BadArgument,
              "extend: seconds must be >= 0, got ", seconds);
  Lease* lease = find_locked(owner);
  if (!lease) return false;
  if (seconds > 0) {
    lease->info.deadline += seconds;
    push_deadline(*lease);
    maybe_compact_heap();
  }
  return true;
}

bool LeaseTable::demote(const Owner& owner, double now, double ttl, int64_t keep_blocks,
                        int64_t* blocks_freed) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  check_now(now, "demote");
  check_ttl(ttl, "demote");
  KVTTL_CHECK(keep_blocks >= 1 || keep_blocks == -1, BadArgument, "demote: keep_blocks must be >= 1 (or -1 to keep all), got ",
              keep_blocks, "; use release to drop a lease");
  *blocks_freed = 0;
  Lease* lease = find_locked(owner);
  if (!lease) return false;
  if (keep_blocks > 0 && static_cast<size_t>(keep_blocks) < lease->blocks.size()) {
    *blocks_freed = target_.unpin_locked(lease->blocks.data() + keep_blocks,
                                       lease->blocks.size() - static_cast<size_t>(keep_blocks));
    lease->blocks.resize(static_cast<size_t>(keep_blocks));
    lease->info.num_blocks = keep_blocks;
  }
  if (now + ttl < lease->info.deadline) {
    lease->info.deadline = now + ttl;
    push_deadline(*lease);
    maybe_compact_heap();
  }
  return true;
}

RevokeResult LeaseTable::revoke_locked(int64_t num_blocks, int64_t max_leases,
                                       const std::vector<uint64_t>& order) {
  RevokeResult result;
  for (uint64_t id : order) {
    if (result.num_blocks_freed >= num_blocks) break;
    if (static_cast<int64_t>(result.revoked.size()) >= max_leases) break;
    if (leases_.find(id) == leases_.end()) continue;
    result.revoked.push_back(end_locked(id));
    result.num_blocks_freed += result.revoked.back().num_blocks_freed;
  }
  maybe_compact_heap();
  return result;
}

namespace {
void check_revoke_targets(int64_t num_blocks, int64_t max_leases) {
  KVTTL_CHECK(num_blocks >= 0, BadArgument, "revoke: num_blocks must be >= 0, got ", num_blocks);
  KVTTL_CHECK(max_leases >= 0, BadArgument, "revoke: num_leases must be >= 0, got ", max_leases);
}
}  // namespace

RevokeResult LeaseTable::revoke(int64_t num_blocks, int64_t max_leases, RevokeOrder order) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  check_revoke_targets(num_blocks, max_leases);
  if (num_blocks == 0 || max_leases == 0 || leases_.empty()) return {};
  std::vector<const LeaseInfo*> infos;
  infos.reserve(leases_.size());
  for (const auto& kv : leases_) infos.push_back(&kv.second.info);
  // Every order breaks ties newest-first, so each is a total order.
  auto newest_first = [](const LeaseInfo* a, const LeaseInfo* b) { return a->lease_id > b->lease_id; };
  std::function<bool(const LeaseInfo*, const LeaseInfo*)> before;
  switch (order) {
    case RevokeOrder::kLatestGranted:
      before = newest_first;
      break;
    case RevokeOrder::kEarliestDeadline:
      before = [&](const LeaseInfo* a, const LeaseInfo* b) {
        return a->deadline != b->deadline ? a->deadline < b->deadline : newest_first(a, b);
      };
      break;
    case RevokeOrder::kLowestPriority:
      before = [&](const LeaseInfo* a, const LeaseInfo* b) {
        return a->priority != b->priority ? a->priority < b->priority : newest_first(a, b);
      };
      break;
    case RevokeOrder::kMostBlocks:
      before = [&](const LeaseInfo* a, const LeaseInfo* b) {
        return a->num_blocks != b->num_blocks ? a->num_blocks > b->num_blocks : newest_first(a, b);
      };
      break;
  }
  std::sort(infos.begin(), infos.end(), before);
  std::vector<uint64_t> ids;
  ids.reserve(infos.size());
  for (const LeaseInfo* info : infos) ids.push_back(info->lease_id);
  return revoke_locked(num_blocks, max_leases, ids);
}

RevokeResult LeaseTable::revoke_in_order(int64_t num_blocks, int64_t max_leases,
                                         const std::vector<uint64_t>& lease_ids) {
  std::lock_guard<std::mutex> lock(target_.mu_);
  check_revoke_targets(num_blocks, max_leases);
  return revoke_locked(num_blocks, max_leases, lease_ids);
}

int64_t LeaseTable::release_all() {
  std::lock_guard<std::mutex> lock(target_.mu_);
  std::vector<uint64_t> ids;
  ids.reserve(leases_.size());
  for (const auto& kv : leases_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());  // grant order: deterministic queue order
  for (uint64_t id : ids) end_locked(id);
  heap_.clear();
  return static_cast<int64_t>(ids.size());
}

bool LeaseTable::get(const Owner& owner, LeaseInfo* out) const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  const Lease* lease = find_locked(owner);
  if (!lease) return false;
  *out = lease->info;
  return true;
}

std::vector<BlockId> LeaseTable::blocks(const Owner& owner) const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  const Lease* lease = find_locked(owner);
  return lease ? lease->blocks : std::vector<BlockId>{};
}

std::vector<LeaseInfo> LeaseTable::leases() const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  std::vector<LeaseInfo> out;
  out.reserve(leases_.size());
  for (const auto& kv : leases_) out.push_back(kv.second.info);
  std::sort(out.begin(), out.end(),
            [](const LeaseInfo& a, const LeaseInfo& b) { return a.lease_id < b.lease_id; });
  return out;
}

std::vector<LeaseInfo> LeaseTable::older_than(double now, double max_age) const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  check_now(now, "older_than");
  KVTTL_CHECK(!std::isnan(max_age) && max_age >= 0, BadArgument,
              "older_than: max_age must be >= 0 seconds, got ", max_age);
  std::vector<LeaseInfo> out;
  for (const auto& kv : leases_)
    if (now - kv.second.info.granted_at > max_age) out.push_back(kv.second.info);
  std::sort(out.begin(), out.end(), [](const LeaseInfo& a, const LeaseInfo& b) {
    return a.granted_at != b.granted_at ? a.granted_at < b.granted_at : a.lease_id < b.lease_id;
  });
  return out;
}

int64_t LeaseTable::num_leases() const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  return static_cast<int64_t>(leases_.size());
}

size_t LeaseTable::heap_size() const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  return heap_.size();
}

void LeaseTable::check_invariants() const {
  std::lock_guard<std::mutex> lock(target_.mu_);
  KVTTL_INVARIANT(by_owner_.size() == leases_.size());
  std::vector<int32_t> cover(static_cast<size_t>(target_.capacity()), 0);
  std::unordered_multimap<uint64_t, double> due;
  for (const HeapEntry& e : heap_) due.emplace(e.lease_id, e.deadline);
  for (const auto& [id, lease] : leases_) {
    KVTTL_INVARIANT(lease.info.lease_id == id && id < next_id_);
    auto owner_it = by_owner_.find(lease.info.owner);
    KVTTL_INVARIANT(owner_it != by_owner_.end() && owner_it->second == id);
    KVTTL_INVARIANT(!lease.blocks.empty());
    KVTTL_INVARIANT(static_cast<int64_t>(lease.blocks.size()) == lease.info.num_blocks);
    for (BlockId b : lease.blocks) ++cover[static_cast<size_t>(b)];
    if (!std::isinf(lease.info.deadline)) {
      bool scheduled = false;
      auto [lo, hi] = due.equal_range(id);
      for (auto it = lo; it != hi; ++it) scheduled |= it->second == lease.info.deadline;
      KVTTL_INVARIANT(scheduled);
    }
  }
  int64_t pinned = 0;
  for (size_t b = 0; b < cover.size(); ++b) {
    KVTTL_INVARIANT(target_.pins_locked(static_cast<BlockId>(b)) == cover[b]);
    pinned += cover[b] > 0;
  }
  KVTTL_INVARIANT(pinned == target_.num_pinned_ && pinned <= max_pinned_);
}

}  // namespace kvttl
