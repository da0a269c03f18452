"""A plain-Python reference model of BlockPool + LeaseTable.

Written from the documented semantics, not from the C++: lists and dicts,
no cleverness, so that it is obviously right and can serve as the oracle of
the stateful tests. It raises the same kvttl.errors types as the native
objects, after the same checks in the same order, and changes nothing when it
raises.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from kvttl.errors import BadArgumentError, DoubleFreeError, KvttlError, OutOfBlocksError, UnknownBlockError

U64 = 1 << 64


def _as_int(x, what):
    if isinstance(x, bool) or isinstance(x, float):
        raise BadArgumentError(what)
    try:
        return operator.index(x)
    except TypeError:
        raise BadArgumentError(what) from None


def _seconds(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise BadArgumentError(what)
    return float(x)


def _owner(x):
    if isinstance(x, str):
        return x
    if isinstance(x, int) and not isinstance(x, bool):
        if not -(1 << 63) <= x < (1 << 63):
            raise BadArgumentError("owner out of range")
        return x
    raise BadArgumentError("owner type")


@dataclass
class ModelLease:
    lease_id: int
    owner: object
    blocks: list
    granted_at: float
    deadline: float
    tool: str = ""
    num_tokens: int = 0
    priority: float = 0.0


class ModelPool:
    def __init__(self, num_blocks: int):
        self.capacity = num_blocks
        self.ref = [0] * num_blocks
        self.pins = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.queue: list[int] = list(range(num_blocks))  # head first
        self.index: dict[int, int] = {}

    # -- helpers --------------------------------------------------------------
    def ids(self, ids) -> list[int]:
        if ids is None or isinstance(ids, (str, bytes)):
            raise BadArgumentError("not a sequence")
        try:
            values = [_as_int(x, "item") for x in ids]
        except TypeError:
            raise BadArgumentError("not iterable") from None
        for b in values:
            if not 0 <= b < self.capacity:
                raise UnknownBlockError(f"block {b}")
        if len(set(values)) != len(values):
            raise BadArgumentError("duplicate")
        return values

    @staticmethod
    def hashes(hs) -> list[int]:
        out = []
        for h in hs:
            h = _as_int(h, "hash")
            if not -(1 << 63) <= h < U64:
                raise BadArgumentError("hash range")
            out.append(h % U64)
        return out

    def is_free(self, b):
        return self.ref[b] == 0 and self.hash[b] is None

    def check_content(self, ids):
        for b in ids:
            if self.is_free(b):
                raise UnknownBlockError(f"block {b} is free")

    def drop_content(self, b):
        h = self.hash[b]
        if h is not None:
            if self.index.get(h) == b:
                del self.index[h]
            self.hash[b] = None

    def release_one(self, b):
        if self.hash[b] is not None:
            self.queue.append(b)
        else:
            self.queue.insert(0, b)

    # -- API --------------------------------------------------------------------
    def allocate(self, n):
        n = _as_int(n, "n")
        if n < 0:
            raise BadArgumentError("n < 0")
        if n > self.capacity:
            raise OutOfBlocksError("n > capacity")
        if n > len(self.queue):
            return None
        out = []
        for _ in range(n):
            b = self.queue.pop(0)
            self.drop_content(b)
            self.ref[b] = 1
            out.append(b)
        return out

    def add_ref(self, ids):
        ids = self.ids(ids)
        self.check_content(ids)
        for b in ids:
            if self.ref[b] == 0:
                self.queue.remove(b)
            self.ref[b] += 1

    def drop_ref(self, ids):
        ids = self.ids(ids)
        for b in ids:
            if self.ref[b] - self.pins[b] <= 0:
                raise DoubleFreeError(f"block {b}")
        released = 0
        for b in ids:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.release_one(b)
                released += 1
        return released

    def register_hashes(self, ids, hashes):
        ids = self.ids(ids)
        hashes = self.hashes(hashes)
        if len(ids) != len(hashes):
            raise BadArgumentError("length")
        for b in ids:
            if self.ref[b] == 0 or self.hash[b] is not None:
                raise BadArgumentError(f"block {b} state")
        indexed = 0
        for b, h in zip(ids, hashes):
            if h not in self.index:
                self.index[h] = b
                self.hash[b] = h
                indexed += 1
        return indexed

    def lookup_prefix(self, hashes):
        out = []
        for h in self.hashes(hashes):
            if h not in self.index or self.index[h] in out:  # a repeated hash ends the run: no block twice
                break
            out.append(self.index[h])
        return out

    def acquire_prefix(self, hashes):
        out = self.lookup_prefix(hashes)
        for b in out:
            if self.ref[b] == 0:
                self.queue.remove(b)
            self.ref[b] += 1
        return out

    def evict(self, ids):
        ids = self.ids(ids)
        for b in ids:
            if self.ref[b] != 0:
                raise BadArgumentError(f"block {b} referenced")
        evicted = 0
        for b in ids:
            if self.hash[b] is None:
                continue
            self.queue.remove(b)
            self.drop_content(b)
            self.queue.insert(0, b)
            evicted += 1
        return evicted

    # -- lease side ---------------------------------------------------------------
    def pin(self, ids):
        for b in ids:
            if self.ref[b] == 0:
                self.queue.remove(b)
            self.ref[b] += 1
            self.pins[b] += 1

    def unpin(self, ids):
        released = 0
        for b in ids:
            self.pins[b] -= 1
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.release_one(b)
                released += 1
        return released

    @property
    def num_cached(self):
        return sum(1 for b in self.queue if self.hash[b] is not None)

    @property
    def num_free(self):
        return len(self.queue) - self.num_cached

    @property
    def num_referenced(self):
        return self.capacity - len(self.queue)

    @property
    def num_pinned(self):
        return sum(1 for p in self.pins if p > 0)


class ModelEngineBlocks:
    """Block ids an engine owns: pins are counted, nothing else is modelled.
    ``unpin`` returns how many blocks no lease pins any more."""

    def __init__(self, num_blocks: int):
        self.capacity = num_blocks
        self.pins = [0] * num_blocks

    def ids(self, ids) -> list[int]:
        if len(set(ids)) != len(ids):
            raise BadArgumentError("duplicate id")
        return list(ids)

    def check_content(self, ids):
        pass

    def pin(self, ids):
        for b in ids:
            self.pins[b] += 1

    def unpin(self, ids):
        unpinned = 0
        for b in ids:
            self.pins[b] -= 1
            unpinned += self.pins[b] == 0
        return unpinned

    @property
    def num_pinned(self):
        return sum(1 for p in self.pins if p > 0)


@dataclass
class ModelTable:
    pool: ModelPool
    cap: float
    leases: dict = field(default_factory=dict)  # owner -> ModelLease
    next_id: int = 1

    def __post_init__(self):
        self.max_pinned = math.floor(self.cap * self.pool.capacity)

    def _end(self, lease):
        freed = self.pool.unpin(lease.blocks)
        del self.leases[lease.owner]
        return lease, freed

    def grant(self, owner, blocks, now, ttl, tool="", num_tokens=0, priority=0.0):
        owner = _owner(owner)
        now = _seconds(now, "now")
        ttl = _seconds(ttl, "ttl")
        pool = self.pool
        if blocks is None or isinstance(blocks, (str, bytes)):
            raise BadArgumentError("blocks")
        values = [_as_int(x, "item") for x in blocks]
        for b in values:
            if not 0 <= b < pool.capacity:
                raise UnknownBlockError(f"block {b}")
        if not math.isfinite(now):
            raise BadArgumentError("now")
        if math.isnan(ttl) or ttl < 0:
            raise BadArgumentError("ttl")
        num_tokens = _as_int(num_tokens, "num_tokens")
        if num_tokens < 0:
            raise BadArgumentError("num_tokens")
        if not math.isfinite(priority):
            raise BadArgumentError("priority")
        if not values:
            raise BadArgumentError("empty")
        ids = pool.ids(values)
        pool.check_content(ids)
        old = self.leases.get(owner)
        new = set(ids)
        added = sum(1 for b in ids if pool.pins[b] == 0)
        removed = 0 if old is None else sum(1 for b in old.blocks if pool.pins[b] == 1 and b not in new)
        if pool.num_pinned + added - removed > self.max_pinned:
            return None
        pool.pin(ids)
        replaced = None
        if old is not None:
            replaced = old.lease_id
            self._end(old)
        lease = ModelLease(self.next_id, owner, ids, now, now + ttl, tool, num_tokens, priority)
        self.next_id += 1
        self.leases[owner] = lease
        return lease, replaced

    def release(self, owner, lease_id=0):
        owner = _owner(owner)
        lease = self.leases.get(owner)
        if lease is None or (lease_id and lease.lease_id != lease_id):
            return None
        return self._end(lease)

    def expire(self, now):
        now = _seconds(now, "now")
        if math.isnan(now):
            raise BadArgumentError("now")
        due = sorted((l for l in self.leases.values() if l.deadline <= now and not math.isinf(l.deadline)), key=lambda l: (l.deadline, l.lease_id))
        return [self._end(l) for l in due]

    def renew(self, owner, now, ttl):
        owner = _owner(owner)
        now, ttl = _seconds(now, "now"), _seconds(ttl, "ttl")
        if not math.isfinite(now) or math.isnan(ttl) or ttl < 0:
            raise BadArgumentError("renew")
        lease = self.leases.get(owner)
        if lease is None:
            return False
        lease.deadline = now + ttl
        return True

    def extend(self, owner, seconds):
        owner = _owner(owner)
        seconds = _seconds(seconds, "seconds")
        if math.isnan(seconds) or seconds < 0:
            raise BadArgumentError("extend")
        lease = self.leases.get(owner)
        if lease is None:
            return False
        lease.deadline += seconds
        return True

    def demote(self, owner, now, ttl, keep_blocks):
        owner = _owner(owner)
        now, ttl = _seconds(now, "now"), _seconds(ttl, "ttl")
        keep_blocks = _as_int(keep_blocks, "keep")
        if not math.isfinite(now) or math.isnan(ttl) or ttl < 0 or keep_blocks == 0:
            raise BadArgumentError("demote")
        lease = self.leases.get(owner)
        if lease is None:
            return None
        freed = 0
        if 0 < keep_blocks < len(lease.blocks):
            freed = self.pool.unpin(lease.blocks[keep_blocks:])
            lease.blocks = lease.blocks[:keep_blocks]
        lease.deadline = min(lease.deadline, now + ttl)
        return freed

    ORDERS = {
        "latest_granted": lambda l: (-l.lease_id,),
        "earliest_deadline": lambda l: (l.deadline, -l.lease_id),
        "lowest_priority": lambda l: (l.priority, -l.lease_id),
        "most_blocks": lambda l: (-len(l.blocks), -l.lease_id),
    }

    def revoke(self, num_blocks=None, order="latest_granted", num_leases=None):
        if num_blocks is None and num_leases is None:
            raise BadArgumentError("revoke needs a target")
        num_blocks = math.inf if num_blocks is None else _as_int(num_blocks, "num_blocks")
        num_leases = math.inf if num_leases is None else _as_int(num_leases, "num_leases")
        if order not in self.ORDERS:
            raise BadArgumentError("order")
        if num_blocks < 0 or num_leases < 0:
            raise BadArgumentError("num_blocks")
        if num_blocks == 0 or num_leases == 0:
            return [], 0
        ranked = sorted(self.leases.values(), key=self.ORDERS[order])
        revoked, freed = [], 0
        for lease in ranked:
            if freed >= num_blocks or len(revoked) >= num_leases:
                break
            _, f = self._end(lease)
            revoked.append((lease, f))
            freed += f
        return revoked, freed

    def release_all(self):
        ranked = sorted(self.leases.values(), key=lambda l: l.lease_id)
        for lease in ranked:
            self._end(lease)
        return len(ranked)


def run_both(native, model):
    """Runs the model, then the native call: both must raise the same error
    type or both return. Returns (native result, model result, raised)."""
    try:
        expected = model()
    except KvttlError as e:
        expected_error = type(e)
    else:
        expected_error = None
    try:
        got = native()
    except KvttlError as e:
        assert expected_error is type(e), f"native raised {e!r}, model {expected_error}"
        return None, None, True
    assert expected_error is None, f"model raised {expected_error}, native returned {got!r}"
    return got, expected, False
