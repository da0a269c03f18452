"""The error contract, walked over every public call of the core.

For each call and each of its arguments, every garbage value from a fixed
catalogue is put in that argument's place (the others stay valid). The call
must either accept the value or raise a ``KvttlError`` whose message names the
call (or the argument) -- never a bare ``TypeError``, ``OverflowError`` or a
C++ exception -- and a call that raised must leave the pool and the table
exactly as they were.

Then the findings of the hostile-input review, each as it was reported.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import kvttl
from kvttl.errors import BadArgumentError, KvttlError

GARBAGE = [None, True, -1, -(2**70), 2**64, 2**400, 1.5, math.nan, math.inf, -math.inf, "1", "\ud800",
           b"x", [], [0, 0], [-1], [2**70], {"a": 1}, object(), np.float64(1.0), np.array([1, 2])]


def _world():
    pool = kvttl.BlockPool(8)
    ids = pool.allocate(4).tolist()
    pool.register_hashes(ids, [100, 101, 102, 103])
    pool.drop_ref(ids[2:])  # 0, 1 referenced; 2, 3 cached
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=lambda: 0.0)
    table.grant("p", [0, 1], 5.0, tool="bash", num_tokens=32)
    return pool, table


def _state(pool, table):
    return (pool.queue_order(), [pool.ref_count(b) for b in range(pool.capacity)],
            [pool.block_hash(b) for b in range(pool.capacity)],
            [(l.lease_id, l.owner, l.deadline, l.num_blocks, l.tool) for l in table])


# (name, call over (pool, table, args), valid args): each argument in turn is replaced by garbage.
CALLS = [
    ("allocate", lambda p, t, a: p.allocate(*a), [1]),
    ("add_ref", lambda p, t, a: p.add_ref(*a), [[2]]),
    ("drop_ref", lambda p, t, a: p.drop_ref(*a), [[0]]),
    ("register_hashes", lambda p, t, a: p.register_hashes(*a), [[4], [999]]),
    ("lookup_prefix", lambda p, t, a: p.lookup_prefix(*a), [[100, 101]]),
    ("acquire_prefix", lambda p, t, a: p.acquire_prefix(*a), [[100, 101]]),
    ("evict", lambda p, t, a: p.evict(*a), [[3]]),
    ("ref_count", lambda p, t, a: p.ref_count(*a), [0]),
    ("pin_count", lambda p, t, a: p.pin_count(*a), [0]),
    ("block_hash", lambda p, t, a: p.block_hash(*a), [0]),
    ("grant", lambda p, t, a: t.grant(a[0], a[1], a[2], tool=a[3], num_tokens=a[4], priority=a[5], now=a[6]),
     ["q", [2, 3], 1.0, "t", 8, 0.0, 0.0]),
    ("release", lambda p, t, a: t.release(a[0], lease_id=a[1]), ["p", 1]),
    ("expire", lambda p, t, a: t.expire(*a), [0.0]),
    ("renew", lambda p, t, a: t.renew(a[0], a[1], now=a[2]), ["p", 1.0, 0.0]),
    ("extend", lambda p, t, a: t.extend(*a), ["p", 1.0]),
    ("demote", lambda p, t, a: t.demote(a[0], a[1], keep_blocks=a[2], now=a[3]), ["p", 1.0, 1, 0.0]),
    ("revoke", lambda p, t, a: t.revoke(a[0], a[1], num_leases=a[2]), [0, "latest_granted", 0]),
    ("get", lambda p, t, a: t.get(*a), ["p"]),
    ("blocks", lambda p, t, a: t.blocks(*a), ["p"]),
    ("older_than", lambda p, t, a: t.older_than(a[0], now=a[1]), [1.0, 0.0]),
    ("contains", lambda p, t, a: a[0] in t, ["p"]),
    ("table pin_count", lambda p, t, a: t.pin_count(*a), [0]),
    ("BlockPool", lambda p, t, a: kvttl.BlockPool(*a), [4]),
    ("LeaseTable", lambda p, t, a: kvttl.LeaseTable(kvttl.BlockPool(2), pinned_share_cap=a[0]), [0.5]),
    ("for_engine_blocks", lambda p, t, a: kvttl.LeaseTable.for_engine_blocks(a[0], pinned_share_cap=a[1]), [4, 0.5]),
]

# What a message may name for each argument besides the call itself.
ARG_NAMES = {
    "grant": ["owner", "grant", "grant", "tool", "num_tokens", "priority", "now"],
    "renew": ["owner", "renew", "renew"],
    "extend": ["owner", "extend"],
    "demote": ["owner", "demote", "demote", "demote"],
    "release": ["owner", "release"],
    "get": ["owner"],
    "blocks": ["owner"],
    "contains": ["owner"],
    "BlockPool": ["num_blocks"],
    "LeaseTable": ["pinned_share_cap"],
    "for_engine_blocks": ["num_blocks", "pinned_share_cap"],
    "table pin_count": ["pin_count"],
}


@pytest.mark.parametrize("name, call, valid", CALLS, ids=[c[0] for c in CALLS])
def test_every_call_refuses_garbage_by_name_and_changes_nothing(name, call, valid):
    for position in range(len(valid)):
        for junk in GARBAGE:
            pool, table = _world()
            before = _state(pool, table)
            args = list(valid)
            args[position] = junk
            try:
                call(pool, table, args)
            except KvttlError as e:
                names = [name.split()[-1], ARG_NAMES.get(name, [name] * len(valid))[position]]
                assert any(n in str(e) for n in names), (name, position, junk, str(e))
                assert _state(pool, table) == before, (name, position, junk)
            except Exception as e:  # noqa: BLE001 - the contract is that nothing else escapes
                pytest.fail(f"{name}: argument {position} = {junk!r} raised {type(e).__name__}: {e}")
            pool.check_invariants()
            table.check_invariants()


# ---- the review's findings, each as reported ---------------------------------------------------

@pytest.mark.parametrize("lease_id", [-1, 2**64, 1.5, "1"])
def test_release_with_a_bad_lease_id_names_it(lease_id):
    pool, table = _world()
    with pytest.raises(BadArgumentError, match=r"release: lease_id .*" + repr(lease_id)[:4].replace(".", r"\.")):
        table.release("p", lease_id=lease_id)
    assert table.get("p") is not None


def test_release_with_a_refused_grants_lease_id_keeps_the_live_lease():
    pool, table = _world()
    capped = kvttl.LeaseTable.for_engine_blocks(4, pinned_share_cap=0.5)
    capped.grant("p", [0], 5.0, now=0.0)
    refused = capped.grant("p", [0, 1, 2], 5.0, now=0.0)
    assert not refused.granted and refused.lease_id == 0
    assert capped.release("p", lease_id=refused.lease_id) is None
    assert capped.get("p") is not None


@pytest.mark.parametrize("n, text", [(-(2**70), "-1180591620717411303424"), (2**70, "1180591620717411303424"),
                                     (2**400, "258224987808690858965591...")])
def test_huge_counts_name_the_call_and_the_value(n, text):
    pool, _ = _world()
    with pytest.raises(BadArgumentError, match=rf"allocate: {text}\.?\.?\.? does not fit"):
        pool.allocate(n)
    with pytest.raises(BadArgumentError, match=rf"add_ref: item 1 \({text}\) does not fit"):
        pool.add_ref([2, n])


def test_demote_keep_blocks_below_one_is_refused_not_keep_all():
    pool, table = _world()
    with pytest.raises(BadArgumentError, match=r"keep_blocks must be >= 1 .*got -1"):
        table.demote("p", keep_blocks=-1, now=0.0)
    assert table.get("p").num_blocks == 2


@pytest.mark.parametrize("call", ["lookup_prefix", "acquire_prefix"])
def test_a_repeated_hash_ends_the_prefix_so_no_block_comes_back_twice(call):
    """acquire_prefix with repeated hashes returned a block twice, which drop_ref then refused."""
    pool, table = _world()
    assert getattr(pool, call)([100, 100, 100]).tolist() == [0]
    assert getattr(pool, call)([100, 101, 100, 102]).tolist() == [0, 1]
    if call == "acquire_prefix":
        assert pool.drop_ref([0]) == 0 and pool.drop_ref([0, 1]) == 0  # each reference taken once, dropped once
    assert pool.ref_count(0) == 2 and pool.ref_count(1) == 2  # the engine's and the lease's
    pool.check_invariants()


def test_revoke_result_repr_names_real_attributes():
    _, table = _world()
    result = table.revoke(num_leases=1)
    text = repr(result)
    for attribute in text[text.index("(") + 1:-1].split(", "):
        name = attribute.split("=")[0]
        assert hasattr(result, name), (name, text)


def test_a_tool_that_is_not_utf8_is_a_bad_argument():
    pool, table = _world()
    with pytest.raises(BadArgumentError, match="grant: tool: string is not valid UTF-8"):
        table.grant("q", [2], 1.0, tool="\ud800", now=0.0)
    assert table.get("q") is None


def test_unhashed_blocks_of_one_batch_are_handed_out_last_first():
    """drop_ref's documented order for blocks with no content."""
    pool = kvttl.BlockPool(4)
    ids = pool.allocate(4).tolist()
    pool.drop_ref(ids)
    assert pool.queue_order()[:4] == list(reversed(ids))
    assert pool.allocate(1).tolist() == [ids[-1]]


# ---- Python code that runs while arguments convert ----------------------------------------------

@pytest.mark.parametrize("call", ["drop_ref", "add_ref", "evict", "lookup_prefix", "grant"])
def test_an_id_whose_index_clears_the_list_is_refused(call):
    """Reading on after the list shrank read freed memory (a SIGSEGV in drop_ref and lookup_prefix)."""
    pool, table = _world()
    before = _state(pool, table)
    ids = [0, 1, None, 3] if call != "lookup_prefix" else [100, 101, None, 103]

    class Clears:
        def __index__(self):
            ids.clear()
            ids.extend([0] * 2)
            return 2

    ids[2] = Clears()
    with pytest.raises(BadArgumentError, match=rf"{call}: the list changed size"):
        if call == "grant":
            table.grant("q", ids, 1.0, now=0.0)
        else:
            getattr(pool, call)(ids)
    assert _state(pool, table) == before


def test_a_nested_call_during_conversion_does_not_overwrite_the_outer_ids():
    """grant('a', [0, 1], num_tokens=Evil) once pinned the nested call's blocks [5, 6]."""
    pool = kvttl.BlockPool(8)
    ids = pool.allocate(8).tolist()
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=lambda: 0.0)

    class Nested:
        def __init__(self, blocks):
            self.blocks = blocks

        def __index__(self):
            table.grant(f"nested-{self.blocks[0]}", self.blocks, 1.0)
            return 1

    table.grant("a", [0, 1], 1.0, num_tokens=Nested([5, 6]))
    assert table.blocks("a").tolist() == [0, 1]
    assert table.blocks("nested-5").tolist() == [5, 6]
    # inside the id list itself, with a nested list long enough to grow the buffer
    table.grant("b", [2, Nested(list(range(8))), 3], 1.0)
    assert table.blocks("b").tolist() == [2, 1, 3]
    assert table.blocks("nested-0").tolist() == list(range(8))
    table.check_invariants()
    pool.drop_ref(ids)
    pool.check_invariants()
