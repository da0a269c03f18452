"""Stateful property test: native BlockPool + LeaseTable against the model.

Random operation sequences, bad input and clock jumps included, run on both;
after every step the two must agree on every observable (results, errors,
counters, per-block refs and hashes, queue order, live leases), and the
invariants of the lease semantics must hold independently of the model.
"""

from __future__ import annotations

import math
from collections import Counter

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvttl
from kvttl.errors import KvttlError

from .model import ModelPool, ModelTable, run_both

OWNERS = st.sampled_from(["a", "b", "c", 1, 2, -7])
TTLS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 3.0, math.inf]),
    st.floats(0, 10, allow_nan=False),
    st.sampled_from([-1.0, math.nan, "5s", None, True]),  # garbage
)
TIMES = st.one_of(st.floats(0, 20, allow_nan=False), st.sampled_from([math.nan, math.inf]))
HASHES = st.integers(0, 12) | st.sampled_from([-1, 2**64 - 1, -(2**63)])
BAD_IDS = st.sampled_from([None, "abc", 3.5, [1.5], [None], [[1]], np.array([1.0]), np.zeros((2, 2), np.int64)])


def as_input(ids, form):
    """The same ids as a list, tuple, int32 or int64 array."""
    if form == 0:
        return list(ids)
    if form == 1:
        return tuple(ids)
    return np.asarray(ids, dtype=np.int32 if form == 2 else np.int64)


class CoreMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 20), cap=st.sampled_from([0.0, 0.3, 0.6, 1.0]))
    def setup(self, n, cap):
        self.now = 0.0
        self.pool = kvttl.BlockPool(n)
        self.table = kvttl.LeaseTable(self.pool, pinned_share_cap=cap, clock=lambda: self.now)
        self.mpool = ModelPool(n)
        self.mtable = ModelTable(self.mpool, cap)
        self.engine_refs = Counter()  # references this "engine" holds, kept apart from both
        self.content = {}  # block -> hash it holds, tracked apart from both
        self.ended = set()  # lease ids already returned by release/expire/revoke

    # -- plumbing ------------------------------------------------------------------
    both = staticmethod(run_both)

    def ids_strategy(self):
        return st.lists(st.integers(-1, self.mpool.capacity), max_size=6)

    def end(self, lease_id):
        assert lease_id not in self.ended, f"lease {lease_id} ended twice"
        self.ended.add(lease_id)

    # -- pool rules -------------------------------------------------------------------
    @rule(n=st.integers(-1, 22))
    def allocate(self, n):
        free_before = [b for b in range(self.mpool.capacity) if self.mpool.ref[b] == 0]
        got, expected, raised = self.both(lambda: self.pool.allocate(n), lambda: self.mpool.allocate(n))
        if raised:
            return
        if expected is None:
            assert got is None
            return
        assert np.asarray(got).dtype == np.int32 and got.tolist() == expected
        for b in expected:
            assert b in free_before, "a referenced block was handed out"
            self.engine_refs[b] += 1
            self.content.pop(b, None)

    @rule(data=st.data(), form=st.integers(0, 3))
    def add_ref(self, data, form):
        ids = data.draw(self.ids_strategy())
        _, _, raised = self.both(lambda: self.pool.add_ref(as_input(ids, form)),
                                 lambda: self.mpool.add_ref(ids))
        if not raised:
            self.engine_refs.update(ids)

    @rule(data=st.data(), form=st.integers(0, 3))
    def drop_ref(self, data, form):
        held = sorted(self.engine_refs.elements())
        if held and data.draw(st.booleans()):
            ids = data.draw(st.lists(st.sampled_from(held), unique=True, max_size=6))
        else:
            ids = data.draw(self.ids_strategy())
        got, expected, raised = self.both(lambda: self.pool.drop_ref(as_input(ids, form)),
                                          lambda: self.mpool.drop_ref(ids))
        if not raised:
            assert got == expected
            self.engine_refs.subtract(ids)
            self.engine_refs += Counter()

    @rule(data=st.data())
    def register(self, data):
        ids = data.draw(self.ids_strategy())
        hashes = data.draw(st.lists(HASHES, min_size=len(ids), max_size=len(ids) + (1 if data.draw(st.booleans()) else 0)))
        got, expected, raised = self.both(lambda: self.pool.register_hashes(ids, hashes),
                                          lambda: self.mpool.register_hashes(ids, hashes))
        if not raised:
            assert got == expected
            for b in ids:
                if self.mpool.hash[b] is not None:
                    self.content[b] = self.mpool.hash[b]

    @rule(hashes=st.lists(HASHES, max_size=6), acquire=st.booleans())
    def lookup(self, hashes, acquire):
        if acquire:
            got, expected, raised = self.both(lambda: self.pool.acquire_prefix(hashes), lambda: self.mpool.acquire_prefix(hashes))
        else:
            got, expected, raised = self.both(lambda: self.pool.lookup_prefix(hashes), lambda: self.mpool.lookup_prefix(hashes))
        if raised:
            return
        assert got.tolist() == expected
        event(f"lookup: {'hit' if expected else 'miss'}")
        for h, b in zip(hashes, expected):
            assert self.content.get(b) == h % 2**64, "lookup returned a block whose content is gone"
        if acquire:
            self.engine_refs.update(expected)

    @rule(data=st.data())
    def evict(self, data):
        ids = data.draw(self.ids_strategy())
        got, expected, raised = self.both(lambda: self.pool.evict(ids), lambda: self.mpool.evict(ids))
        if not raised:
            assert got == expected
            for b in ids:
                self.content.pop(b, None)

    @rule(bad=BAD_IDS, op=st.sampled_from(["add_ref", "drop_ref", "evict", "lookup_prefix"]))
    def garbage_ids(self, bad, op):
        before = self.snapshot()
        try:
            getattr(self.pool, op)(bad)
        except KvttlError:
            pass
        else:
            raise AssertionError(f"{op}({bad!r}) did not raise")
        assert self.snapshot() == before

    # -- lease rules --------------------------------------------------------------------
    @rule(data=st.data(), owner=OWNERS, ttl=TTLS, tool=st.sampled_from(["", "bash", "search"]))
    def grant(self, data, owner, ttl, tool):
        referenced = [b for b in range(self.mpool.capacity) if not self.mpool.is_free(b)]
        if referenced and data.draw(st.booleans()):
            ids = data.draw(st.lists(st.sampled_from(referenced), unique=True, min_size=1, max_size=6))
        else:
            ids = data.draw(self.ids_strategy())
        got, expected, raised = self.both(
            lambda: self.table.grant(owner, ids, ttl, tool=tool, num_tokens=16 * len(ids)),
            lambda: self.mtable.grant(owner, ids, self.now, ttl, tool, 16 * len(ids)),
        )
        if raised:
            event("grant: error")
            return
        if expected is None:
            event("grant: refused by cap")
            assert not got.granted and "cap" in got.reason
            return
        lease, replaced = expected
        event("grant: replaced" if replaced else "grant: new")
        assert got.granted and got.lease_id == lease.lease_id and got.deadline == lease.deadline
        assert got.replaced_lease_id == replaced
        if replaced is not None:
            self.end(replaced)

    @rule(owner=OWNERS, stale=st.booleans())
    def release(self, owner, stale):
        lease = self.mtable.leases.get(owner)
        lease_id = (lease.lease_id + 1000 if stale else lease.lease_id) if lease else 0
        got, expected, _ = self.both(lambda: self.table.release(owner, lease_id=lease_id),
                                     lambda: self.mtable.release(owner, lease_id))
        if expected is None:
            assert got is None
        else:
            assert got.lease_id == expected[0].lease_id and got.num_blocks_freed == expected[1]
            self.end(got.lease_id)

    @rule(dt=st.one_of(st.floats(0, 4), st.sampled_from([-3.0, 100.0])))
    def advance_clock_and_expire(self, dt):
        self.now += dt  # backwards jumps too: an injected clock may do that
        got, expected, raised = self.both(lambda: self.table.expire(), lambda: self.mtable.expire(self.now))
        assert not raised
        assert [l.lease_id for l in got] == [l.lease_id for l, _ in expected]
        assert [l.num_blocks_freed for l in got] == [f for _, f in expected]
        event(f"expire: {min(len(got), 2)}+ leases")
        for lease in got:
            assert lease.deadline <= self.now, "expired a lease whose deadline is ahead"
            self.end(lease.lease_id)

    @rule(now=TIMES)
    def expire_at(self, now):
        got, expected, raised = self.both(lambda: self.table.expire(now), lambda: self.mtable.expire(now))
        if not raised:
            assert [l.lease_id for l in got] == [l.lease_id for l, _ in expected]
            for lease in got:
                self.end(lease.lease_id)

    @rule(owner=OWNERS, ttl=TTLS, how=st.sampled_from(["renew", "extend"]))
    def renew_or_extend(self, owner, ttl, how):
        if how == "renew":
            got, expected, _ = self.both(lambda: self.table.renew(owner, ttl), lambda: self.mtable.renew(owner, self.now, ttl))
        else:
            got, expected, _ = self.both(lambda: self.table.extend(owner, ttl), lambda: self.mtable.extend(owner, ttl))
        assert got == expected

    @rule(owner=OWNERS, ttl=TTLS, keep=st.sampled_from([None, 0, 1, 2, 3, 100]))
    def demote(self, owner, ttl, keep):
        got, expected, _ = self.both(
            lambda: self.table.demote(owner, ttl, keep_blocks=keep),
            lambda: self.mtable.demote(owner, self.now, ttl, -1 if keep is None else keep),
        )
        assert got == expected

    @rule(n=st.one_of(st.none(), st.integers(-1, 25)), k=st.one_of(st.none(), st.integers(-1, 4)),
          order=st.sampled_from(["latest_granted", "earliest_deadline", "lowest_priority", "most_blocks", "bogus"]))
    def revoke(self, n, k, order):
        got, expected, raised = self.both(lambda: self.table.revoke(n, order, num_leases=k),
                                          lambda: self.mtable.revoke(n, order, k))
        if raised:
            return
        revoked, freed = expected
        event(f"revoke: {'freed' if freed else 'nothing'}")
        assert [l.lease_id for l in got.revoked] == [l.lease_id for l, _ in revoked]
        assert got.num_blocks_freed == freed
        for lease in got.revoked:
            self.end(lease.lease_id)

    @rule()
    def revoke_by_key(self):
        # A Python key: most tokens first. Model: the same ranking, by hand.
        key = lambda l: (-l.num_tokens, l.lease_id)  # noqa: E731
        ranked = sorted(self.mtable.leases.values(), key=lambda l: (-l.num_tokens, l.lease_id))
        got = self.table.revoke(3, order=key)
        freed, expect = 0, []
        for lease in ranked:
            if freed >= 3:
                break
            _, f = self.mtable._end(lease)
            expect.append(lease.lease_id)
            freed += f
        assert [l.lease_id for l in got.revoked] == expect and got.num_blocks_freed == freed
        for lease_id in expect:
            self.end(lease_id)

    @rule(data=st.data())
    def drain(self, data):
        """Drop every lease and engine reference: nothing may stay referenced."""
        if not data.draw(st.integers(0, 9)) == 0:
            return
        released = self.table.release_all()
        assert released == self.mtable.release_all()
        for b, n in list(self.engine_refs.items()):
            for _ in range(n):
                self.pool.drop_ref([b])
                self.mpool.drop_ref([b])
        self.engine_refs.clear()
        self.ended.update(range(1, self.mtable.next_id))
        assert self.pool.num_referenced == 0 and self.pool.num_pinned == 0, "a block leaked"

    @rule(owner=st.sampled_from([None, 1.5, ("a",), b"a", True, 2**70]))
    def garbage_owner(self, owner):
        before = self.snapshot()
        for call in (lambda: self.table.grant(owner, [0], 1.0), lambda: self.table.release(owner),
                     lambda: self.table.renew(owner, 1.0)):
            try:
                call()
            except KvttlError:
                pass
            else:
                raise AssertionError(f"owner {owner!r} accepted")
        assert self.snapshot() == before

    # -- observables and invariants ----------------------------------------------------
    def snapshot(self):
        p = self.pool
        return (
            p.num_free, p.num_cached, p.num_referenced, p.num_pinned, p.queue_order(),
            [(p.ref_count(b), p.pin_count(b), p.block_hash(b)) for b in range(p.capacity)],
            [(l.lease_id, l.owner, l.deadline, l.num_blocks) for l in self.table.leases()],
        )

    @invariant()
    def agrees_with_model(self):
        if not hasattr(self, "pool"):
            return
        p, m = self.pool, self.mpool
        assert p.queue_order() == m.queue
        assert [p.ref_count(b) for b in range(m.capacity)] == m.ref
        assert [p.pin_count(b) for b in range(m.capacity)] == m.pins
        assert [p.block_hash(b) for b in range(m.capacity)] == m.hash
        assert (p.num_free, p.num_cached, p.num_referenced, p.num_pinned) == (
            m.num_free, m.num_cached, m.num_referenced, m.num_pinned)
        live = sorted((l.lease_id, l.owner, l.deadline, l.num_blocks, l.tool) for l in self.table.leases())
        want = sorted((l.lease_id, l.owner, l.deadline, len(l.blocks), l.tool) for l in self.mtable.leases.values())
        assert live == want
        for l in self.mtable.leases.values():
            assert self.table.blocks(l.owner).tolist() == l.blocks

    @invariant()
    def lease_semantics(self):
        if not hasattr(self, "pool"):
            return
        p = self.pool
        cover = Counter(b for l in self.table.leases() for b in self.table.blocks(l.owner).tolist())
        for b in range(p.capacity):
            # ref(b) = engine references + live leases covering b
            assert p.ref_count(b) == self.engine_refs[b] + cover[b]
        assert p.num_free + p.num_cached + p.num_referenced == p.capacity
        assert p.num_pinned <= self.table.max_pinned_blocks
        assert not {l.lease_id for l in self.table.leases()} & self.ended
        p.check_invariants()
        self.table.check_invariants()


CoreMachine.TestCase.settings = settings(
    max_examples=int(__import__("os").environ.get("KVTTL_HYPOTHESIS_EXAMPLES", 300)),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCoreStateful = CoreMachine.TestCase


def test_the_model_ends_a_prefix_at_a_repeated_hash_as_the_pool_does():
    """Found by this state machine on CI: the native pool ends a prefix run at
    a repeated hash (no block comes back twice), the model handed the block
    out again, so lookup_prefix([0, 0]) disagreed ([0] against [0, 0])."""
    pool, model = kvttl.BlockPool(2), ModelPool(2)
    for p in (pool, model):
        ids = p.allocate(2)
        p.register_hashes(ids, [7, 8])
    for hashes in ([7, 7], [7, 8, 7], [8, 8, 7]):
        assert pool.lookup_prefix(hashes).tolist() == model.lookup_prefix(hashes)
        assert pool.acquire_prefix(hashes).tolist() == model.acquire_prefix(hashes)
