"""LeaseTable over blocks an engine owns (``LeaseTable.for_engine_blocks``):
no kvttl pool behind it, pins counted per block, against the same model.

    engine's pool:  [0 1 2 3 4 5 6 7]      kvttl:  pins [1 1 2 1 0 0 0 0]
    lease a: 0 1 2  lease b: 2 3           num_pinned 4; releasing b "frees" 3 only
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvttl
from kvttl.errors import BadArgumentError, UnknownBlockError

from .model import ModelEngineBlocks, ModelTable, run_both


def table(n=8, cap=1.0):
    clock = [0.0]
    return kvttl.LeaseTable.for_engine_blocks(n, pinned_share_cap=cap, clock=lambda: clock[0]), clock


def test_pins_are_counted_and_freed_blocks_are_those_no_lease_holds():
    t, _ = table()
    assert t.pool is None and t.capacity == 8
    assert t.grant("a", [0, 1, 2], 10.0).granted
    assert t.grant("b", [2, 3], 10.0).granted
    assert t.num_pinned == 4 and [t.pin_count(b) for b in range(4)] == [1, 1, 2, 1]
    assert t.release("b").num_blocks_freed == 1  # block 2 is still a's
    assert t.num_pinned == 3
    t.check_invariants()


def test_any_block_id_in_range_can_be_leased_without_content():
    t, _ = table(4)
    assert t.grant("a", [3, 0], 1.0).granted  # nothing was ever "allocated"
    with pytest.raises(UnknownBlockError, match="outside"):
        t.grant("b", [4], 1.0)
    with pytest.raises(BadArgumentError, match="more than once"):
        t.grant("b", [1, 1], 1.0)
    assert "b" not in t and t.num_pinned == 2


def test_the_cap_counts_distinct_pinned_blocks():
    t, _ = table(10, cap=0.5)  # 5 blocks
    assert t.grant("a", [0, 1, 2, 3], 1.0).granted
    assert t.grant("b", [0, 1, 2, 3], 1.0).granted  # a shared prefix counts once
    refused = t.grant("c", [4, 5], 1.0)
    assert not refused.granted and "cap" in refused.reason and "c" not in t


def test_revoke_by_count_of_leases_in_the_callers_order():
    t, _ = table(16)
    for i, owner in enumerate("abcd"):
        t.grant(owner, [4 * i, 4 * i + 1], 10.0, priority=float(i))
    # Continuum's order: the latest program (highest priority value) first.
    result = t.revoke(num_leases=2, order=lambda lease: -lease.priority)
    assert [lease.owner for lease in result.revoked] == ["d", "c"] and result.num_blocks_freed == 4
    assert [lease.owner for lease in t.leases()] == ["a", "b"]
    # A block target stops at the first lease that meets it; a lease cap stops sooner.
    assert len(t.revoke(1, num_leases=5).revoked) == 1
    assert len(t.revoke(100, num_leases=0).revoked) == 0
    with pytest.raises(BadArgumentError, match="num_blocks, num_leases"):
        t.revoke()


def test_one_table_per_pool():
    pool = kvttl.BlockPool(4)
    first = kvttl.LeaseTable(pool)
    with pytest.raises(BadArgumentError, match="already have a lease table"):
        kvttl.LeaseTable(pool)
    del first
    kvttl.LeaseTable(pool)  # the first one is gone: its pool may get a new table


def test_a_refused_grants_lease_id_releases_nothing():
    t, _ = table()
    t.grant("a", [0], 10.0)
    refused = kvttl.LeaseTable.for_engine_blocks(4, pinned_share_cap=0.0).grant("x", [0], 1.0)
    assert not refused.granted and refused.lease_id == 0
    assert t.release("a", lease_id=refused.lease_id) is None and "a" in t
    for bad in (-1, 2**64, 1.5, "1", True):
        with pytest.raises(BadArgumentError, match="lease_id"):
            t.release("a", lease_id=bad)
    assert "a" in t


OWNERS = st.sampled_from(["a", "b", "c", 7])
TTLS = st.sampled_from([0.0, 0.5, 2.0, math.inf, -1.0, math.nan])


class EngineBlocksMachine(RuleBasedStateMachine):
    """Random lease traffic on engine blocks against ModelTable(ModelEngineBlocks)."""

    @initialize(n=st.integers(1, 12), cap=st.sampled_from([0.0, 0.4, 1.0]))
    def setup(self, n, cap):
        self.now = 0.0
        self.table = kvttl.LeaseTable.for_engine_blocks(n, pinned_share_cap=cap, clock=lambda: self.now)
        self.model = ModelTable(ModelEngineBlocks(n), cap)

    both = staticmethod(run_both)

    @rule(data=st.data(), owner=OWNERS, ttl=TTLS)
    def grant(self, data, owner, ttl):
        ids = data.draw(st.lists(st.integers(-1, self.model.pool.capacity), min_size=1, max_size=5))
        got, expected, raised = self.both(lambda: self.table.grant(owner, ids, ttl),
                                          lambda: self.model.grant(owner, ids, self.now, ttl))
        if not raised:
            assert got.granted == (expected is not None)
            if expected is not None:
                assert got.lease_id == expected[0].lease_id and got.replaced_lease_id == expected[1]

    @rule(owner=OWNERS)
    def release(self, owner):
        got, expected, _ = self.both(lambda: self.table.release(owner), lambda: self.model.release(owner))
        assert (got is None) == (expected is None)
        if got is not None:
            assert got.num_blocks_freed == expected[1]

    @rule(dt=st.floats(0, 3))
    def advance_and_expire(self, dt):
        self.now += dt
        got, expected, _ = self.both(lambda: self.table.expire(), lambda: self.model.expire(self.now))
        assert [(l.lease_id, l.num_blocks_freed) for l in got] == [(l.lease_id, f) for l, f in expected]

    @rule(n=st.one_of(st.none(), st.integers(0, 6)), k=st.one_of(st.none(), st.integers(0, 3)),
          order=st.sampled_from(["latest_granted", "most_blocks"]))
    def revoke(self, n, k, order):
        got, expected, raised = self.both(lambda: self.table.revoke(n, order, num_leases=k),
                                          lambda: self.model.revoke(n, order, k))
        if not raised:
            assert [l.lease_id for l in got.revoked] == [l.lease_id for l, _ in expected[0]]
            assert got.num_blocks_freed == expected[1]

    @rule(owner=OWNERS, keep=st.sampled_from([None, 1, 2]))
    def demote(self, owner, keep):
        got, expected, _ = self.both(lambda: self.table.demote(owner, 1.0, keep_blocks=keep),
                                     lambda: self.model.demote(owner, self.now, 1.0, -1 if keep is None else keep))
        assert got == expected

    @invariant()
    def agrees_with_model(self):
        if not hasattr(self, "table"):
            return
        pool = self.model.pool
        assert [self.table.pin_count(b) for b in range(pool.capacity)] == pool.pins
        assert self.table.num_pinned == pool.num_pinned <= self.table.max_pinned_blocks
        live = sorted((l.lease_id, l.owner, l.num_blocks) for l in self.table.leases())
        assert live == sorted((l.lease_id, l.owner, len(l.blocks)) for l in self.model.leases.values())
        self.table.check_invariants()


EngineBlocksMachine.TestCase.settings = settings(
    max_examples=int(__import__("os").environ.get("KVTTL_HYPOTHESIS_EXAMPLES", 200)), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestEngineBlocksStateful = EngineBlocksMachine.TestCase
