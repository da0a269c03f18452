"""LeaseTable behaviour and error paths."""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest

import kvttl
from kvttl.errors import BadArgumentError, UnknownBlockError


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def cached_pool(n, hashed):
    """A pool whose first `hashed` blocks are cached (ref 0, with content)."""
    pool = kvttl.BlockPool(n)
    ids = pool.allocate(hashed).tolist()
    pool.register_hashes(ids, [1000 + b for b in ids])
    pool.drop_ref(ids)
    return pool


@pytest.fixture
def clock():
    return Clock()


def test_lease_pins_cached_blocks_until_expiry(clock):
    pool = cached_pool(4, 2)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    g = table.grant("prog", [0, 1], 5.0, tool="bash", num_tokens=32, priority=2.0)
    assert g.granted and g.deadline == 5.0 and g.replaced_lease_id is None
    assert (pool.num_pinned, pool.num_cached, pool.num_free) == (2, 0, 2)
    assert pool.allocate(3) is None  # pinned blocks are not allocatable
    info = table.get("prog")
    assert (info.tool, info.num_tokens, info.priority, info.num_blocks) == ("bash", 32, 2.0, 2)
    clock.now = 4.999
    assert table.expire() == []
    clock.now = 5.0
    (gone,) = table.expire()
    assert gone.lease_id == g.lease_id and gone.num_blocks_freed == 2
    assert (pool.num_pinned, pool.num_cached) == (0, 2)
    assert table.expire() == []  # each lease expires once
    assert table.release("prog") is None  # a normal race, reported not raised


def test_free_blocks_cannot_be_leased(clock):
    pool = cached_pool(4, 1)
    table = kvttl.LeaseTable(pool, clock=clock)
    with pytest.raises(UnknownBlockError, match="block 2 is free"):
        table.grant("p", [0, 2], 1.0)
    assert table.num_leases == 0 and pool.num_pinned == 0


def test_replacement_takes_new_references_before_dropping_old(clock):
    pool = cached_pool(6, 4)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    first = table.grant("p", [0, 1, 2], 10.0)
    order_before = pool.queue_order()
    second = table.grant("p", [1, 2, 3], 10.0)
    assert second.replaced_lease_id == first.lease_id
    # 1 and 2 were held by the old lease alone: had they been released in
    # between they would have entered the queue. They never did.
    assert pool.ref_count(1) == pool.ref_count(2) == 1
    assert pool.queue_order() == [b for b in order_before if b != 3] + [0]
    assert table.blocks("p").tolist() == [1, 2, 3] and table.num_leases == 1
    assert table.release("p", lease_id=first.lease_id) is None  # stale id releases nothing
    assert table.release("p", lease_id=second.lease_id).num_blocks_freed == 3


def test_cap_refuses_and_changes_nothing(clock):
    pool = cached_pool(10, 8)
    table = kvttl.LeaseTable(pool, pinned_share_cap=0.5, clock=clock)
    assert table.max_pinned_blocks == 5
    assert table.grant("a", [0, 1, 2], 1.0)
    before = (pool.queue_order(), pool.num_pinned)
    refused = table.grant("b", [3, 4, 5], 1.0)
    assert not refused.granted and not refused
    assert "would pin 6 of 10 blocks" in refused.reason and "allows 5" in refused.reason
    assert (pool.queue_order(), pool.num_pinned) == before and "b" not in table
    # Shared blocks count once.
    assert table.grant("c", [1, 2, 3, 4], 1.0)
    assert pool.num_pinned == 5


def test_cap_counts_a_replacement_net_of_what_it_releases(clock):
    pool = cached_pool(10, 8)
    table = kvttl.LeaseTable(pool, pinned_share_cap=0.5, clock=clock)
    assert table.grant("a", [0, 1, 2, 3, 4], 1.0)  # at the cap
    # Replacing a's lease by one of the same size is allowed: it releases as
    # much as it pins.
    assert table.grant("a", [3, 4, 5, 6, 7], 1.0).granted
    assert pool.num_pinned == 5
    refused = table.grant("a", [2, 3, 4, 5, 6, 7], 1.0)
    assert not refused.granted and table.blocks("a").tolist() == [3, 4, 5, 6, 7]


def test_zero_cap_pins_nothing(clock):
    pool = cached_pool(4, 4)
    table = kvttl.LeaseTable(pool, pinned_share_cap=0.0, clock=clock)
    assert not table.grant("a", [0], 1.0).granted


def test_revoke_latest_granted_first_until_enough_is_freed(clock):
    pool = cached_pool(10, 9)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    for owner, blocks in [("old", [0, 1, 2]), ("mid", [3, 4]), ("new", [5, 6, 7, 8])]:
        table.grant(owner, blocks, 60.0)
        clock.now += 1
    r = table.revoke(5)
    assert [l.owner for l in r.revoked] == ["new", "mid"] and r.num_blocks_freed == 6
    assert list(table) and [l.owner for l in table] == ["old"]
    assert table.revoke(0).revoked == []


def test_revoke_counts_only_blocks_that_really_free(clock):
    pool = kvttl.BlockPool(6)
    ids = pool.allocate(4).tolist()  # the engine still references them
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant("running", ids[:2], 60.0)
    clock.now = 1
    pool.register_hashes(ids[2:], [1, 2])
    pool.drop_ref(ids[2:])
    table.grant("idle", ids[2:], 60.0)
    clock.now = 2
    r = table.revoke(2, order="earliest_deadline")
    # Both deadlines are 60 and 61; "running" is first but frees nothing.
    assert [(l.owner, l.num_blocks_freed) for l in r.revoked] == [("running", 0), ("idle", 2)]
    assert r.num_blocks_freed == 2 and pool.num_referenced == 2


@pytest.mark.parametrize("order, first", [("earliest_deadline", "soon"), ("lowest_priority", "cheap"),
                                          ("most_blocks", "big"), (lambda l: -l.num_tokens, "long")])
def test_revocation_orders(clock, order, first):
    pool = cached_pool(12, 10)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant("soon", [0], 1.0, priority=5, num_tokens=1)
    table.grant("cheap", [1], 9.0, priority=-1, num_tokens=2)
    table.grant("big", [2, 3, 4], 9.0, priority=5, num_tokens=3)
    table.grant("long", [5], 9.0, priority=5, num_tokens=99)
    assert table.revoke(1, order=order).revoked[0].owner == first


def test_revoke_rejects_unknown_orders(clock):
    table = kvttl.LeaseTable(cached_pool(2, 1), clock=clock)
    with pytest.raises(BadArgumentError, match="latest_granted"):
        table.revoke(1, order="random")
    with pytest.raises(BadArgumentError, match="key function"):
        table.revoke(1, order=3)
    with pytest.raises(BadArgumentError, match="num_blocks"):
        table.revoke(-1)


def test_renew_extend_demote(clock):
    pool = cached_pool(6, 5)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant("p", [0, 1, 2, 3], 5.0)
    clock.now = 3.0
    assert table.renew("p", 10.0) and table.get("p").deadline == 13.0
    assert table.extend("p", 2.0) and table.get("p").deadline == 15.0
    assert table.demote("p", 100.0) == 0 and table.get("p").deadline == 15.0  # never lengthens
    assert table.demote("p", 1.0, keep_blocks=2) == 2
    assert table.get("p").deadline == 4.0 and table.blocks("p").tolist() == [0, 1]
    assert pool.num_pinned == 2 and pool.num_cached == 3
    assert table.renew("nobody", 1.0) is False and table.extend("nobody", 1.0) is False
    assert table.demote("nobody", 1.0) is None
    clock.now = 4.0
    assert [l.owner for l in table.expire()] == ["p"]


def test_lazy_deletion_keeps_the_heap_bounded(clock):
    pool = cached_pool(4, 4)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant("p", [0], 1.0)
    for i in range(10_000):
        table.renew("p", 1.0 + i)
    assert table._native.heap_size <= 2 * table.num_leases + 64 + 1
    clock.now = 2.0
    assert table.expire() == []  # the stale deadlines are skipped
    clock.now = 1e5
    assert len(table.expire()) == 1


def test_infinite_ttl_never_expires_but_can_be_revoked(clock):
    pool = cached_pool(2, 1)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    assert table.grant("p", [0], math.inf).deadline == math.inf
    assert table.expire(math.inf) == []
    assert table.revoke(1).num_blocks_freed == 1


def test_leak_detector_lists_old_leases(clock):
    pool = cached_pool(4, 3)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant(7, [0], math.inf)
    clock.now = 100
    table.grant("young", [1], math.inf)
    clock.now = 400
    old = table.older_than(300)
    assert [(l.owner, l.granted_at) for l in old] == [(7, 0.0)]


def test_int_and_str_owners_are_distinct(clock):
    table = kvttl.LeaseTable(cached_pool(4, 2), pinned_share_cap=1.0, clock=clock)
    table.grant(1, [0], 1.0)
    table.grant("1", [1], 1.0)
    assert table.num_leases == 2 and table.get(1).owner == 1 and table.get("1").owner == "1"


def test_explicit_now_overrides_the_clock(clock):
    table = kvttl.LeaseTable(cached_pool(2, 1), clock=clock)
    assert table.grant("p", [0], 2.0, now=100.0).deadline == 102.0
    assert table.expire(now=101.0) == [] and len(table.expire(now=102.0)) == 1


def test_dropping_the_table_returns_its_pins(clock):
    pool = cached_pool(4, 2)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant("p", [0, 1], math.inf)
    del table
    gc.collect()
    assert pool.num_pinned == 0 and pool.num_cached == 2


def test_pool_outlives_a_table_that_refers_to_it(clock):
    table = kvttl.LeaseTable(cached_pool(4, 2), pinned_share_cap=1.0, clock=clock)
    gc.collect()
    table.grant("p", [0], 1.0)
    assert table.pool.num_pinned == 1


@pytest.mark.parametrize("call, words", [
    (lambda t: t.grant("p", [0], -1.0), ["ttl", ">= 0"]),
    (lambda t: t.grant("p", [0], math.nan), ["ttl", "nan"]),
    (lambda t: t.grant("p", [0], "5m"), ["ttl", "str"]),
    (lambda t: t.grant("p", [], 1.0), ["at least one block"]),
    (lambda t: t.grant("p", [0, 0], 1.0), ["more than once"]),
    (lambda t: t.grant("p", [0], 1.0, now=math.nan), ["now", "finite"]),
    (lambda t: t.grant("p", [0], 1.0, num_tokens=-5), ["num_tokens", "-5"]),
    (lambda t: t.grant("p", [0], 1.0, priority=math.inf), ["priority"]),
    (lambda t: t.grant("p", [0], 1.0, tool=5), ["tool", "str"]),
    (lambda t: t.grant(None, [0], 1.0), ["owner", "NoneType"]),
    (lambda t: t.grant(2.5, [0], 1.0), ["owner", "float"]),
    (lambda t: t.grant(2**64, [0], 1.0), ["owner", "64 bits"]),
    (lambda t: t.renew("p", -2.0), ["renew", "ttl"]),
    (lambda t: t.extend("p", math.nan), ["extend"]),
    (lambda t: t.demote("p", 1.0, keep_blocks=0), ["keep_blocks", "release"]),
    (lambda t: t.expire(math.nan), ["expire", "NaN"]),
    (lambda t: t.older_than(-1.0), ["max_age"]),
])
def test_lease_errors_change_nothing(clock, call, words):
    pool = cached_pool(4, 2)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=clock)
    table.grant("p", [1], 3.0)
    before = ([(l.lease_id, l.deadline, l.num_blocks) for l in table], pool.queue_order(), pool.num_pinned)
    with pytest.raises(BadArgumentError) as info:
        call(table)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert ([(l.lease_id, l.deadline, l.num_blocks) for l in table], pool.queue_order(), pool.num_pinned) == before
    table.check_invariants()


@pytest.mark.parametrize("cap", [-0.1, 1.5, math.nan, "half"])
def test_bad_caps(cap):
    with pytest.raises(BadArgumentError, match="pinned_share_cap"):
        kvttl.LeaseTable(kvttl.BlockPool(2), pinned_share_cap=cap)


def test_table_needs_a_pool_and_a_callable_clock():
    with pytest.raises(BadArgumentError, match="BlockPool"):
        kvttl.LeaseTable(object())
    with pytest.raises(BadArgumentError, match="callable"):
        kvttl.LeaseTable(kvttl.BlockPool(2), clock=5)


def test_concurrent_threads_leave_consistent_state():
    """Engine threads and a lease thread hammer one pool; every call is atomic."""
    pool = kvttl.BlockPool(256)
    now = [0.0]
    table = kvttl.LeaseTable(pool, pinned_share_cap=0.5, clock=lambda: now[0])
    errors = []

    def engine(seed):
        rng = np.random.default_rng(seed)
        try:
            for i in range(2000):
                ids = pool.allocate(int(rng.integers(1, 8)))
                if ids is None:
                    table.revoke(8)
                    continue
                pool.register_hashes(ids, rng.integers(0, 2**62, len(ids)))
                owner = int(rng.integers(0, 32))
                table.grant(owner, ids, float(rng.uniform(0, 2)))
                pool.drop_ref(ids[::-1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def expirer():
        for _ in range(4000):
            now[0] += 0.001
            table.expire()

    threads = [threading.Thread(target=engine, args=(s,)) for s in range(3)] + [threading.Thread(target=expirer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pool.check_invariants()
    table.check_invariants()
    table.release_all()
    assert pool.num_referenced == 0 and pool.num_pinned == 0
