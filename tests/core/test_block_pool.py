"""BlockPool behaviour and every error path, one case at a time."""

from __future__ import annotations

import numpy as np
import pytest

import kvttl
from kvttl.errors import (
    BadArgumentError,
    DoubleFreeError,
    KvttlError,
    OutOfBlocksError,
    UnknownBlockError,
)


def state(pool):
    return (pool.num_free, pool.num_cached, pool.num_referenced, pool.queue_order(),
            [pool.ref_count(b) for b in range(pool.capacity)])


def test_fresh_pool_is_all_free_in_id_order():
    pool = kvttl.BlockPool(4)
    assert (pool.capacity, pool.num_free, pool.num_cached, pool.num_referenced) == (4, 4, 0, 0)
    assert pool.queue_order() == [0, 1, 2, 3]


def test_allocate_returns_int32_ids_from_the_head():
    pool = kvttl.BlockPool(8)
    ids = pool.allocate(3)
    assert np.asarray(ids).dtype == np.int32 and ids.tolist() == [0, 1, 2]
    assert (pool.num_free, pool.num_referenced) == (5, 3)
    assert [pool.ref_count(b) for b in ids] == [1, 1, 1]


def test_shortfall_is_none_and_changes_nothing():
    pool = kvttl.BlockPool(4)
    pool.allocate(3)
    before = state(pool)
    assert pool.allocate(2) is None
    assert state(pool) == before
    assert pool.allocate(0).tolist() == []


def test_eviction_order_free_first_then_lru_of_release():
    pool = kvttl.BlockPool(6)
    ids = pool.allocate(6).tolist()
    pool.register_hashes(ids[:4], [10, 11, 12, 13])
    # Release in reverse, as an engine does with a request's blocks: the
    # tail (13) goes first into the cached LRU end, so it is evicted first.
    pool.drop_ref(ids[:4][::-1])
    pool.drop_ref(ids[4:])  # unhashed: to the head, reused before any cached block
    # head -> 5 -> 4 -> 3(h13) -> 2(h12) -> 1(h11) -> 0(h10) <- tail
    assert pool.queue_order() == [5, 4, 3, 2, 1, 0]
    assert (pool.num_free, pool.num_cached) == (2, 4)
    assert pool.allocate(3).tolist() == [5, 4, 3]  # 3 is evicted: its hash is gone
    assert pool.block_hash(3) is None
    assert pool.lookup_prefix([10, 11, 12, 13]).tolist() == [0, 1, 2]


def test_prefix_hit_revives_cached_block_from_the_middle():
    pool = kvttl.BlockPool(4)
    ids = pool.allocate(3).tolist()
    pool.register_hashes(ids, [1, 2, 3])
    pool.drop_ref(ids)
    # head -> 3 -> 0 -> 1 -> 2 <- tail
    assert pool.queue_order() == [3, 0, 1, 2]
    hit = pool.acquire_prefix([1, 2, 99])
    assert hit.tolist() == [0, 1]
    assert pool.queue_order() == [3, 2]
    assert (pool.ref_count(0), pool.ref_count(1)) == (1, 1)
    pool.drop_ref([1, 0])
    assert pool.queue_order() == [3, 2, 1, 0]  # re-released: most recently used at the tail


def test_lookup_takes_no_reference_and_stops_at_first_miss():
    pool = kvttl.BlockPool(4)
    ids = pool.allocate(3).tolist()
    pool.register_hashes(ids, [1, 2, 3])
    assert pool.lookup_prefix([1, 5, 3]).tolist() == [0]
    assert pool.lookup_prefix([]).tolist() == []
    assert [pool.ref_count(b) for b in ids] == [1, 1, 1]


def test_duplicate_content_is_not_indexed_twice():
    pool = kvttl.BlockPool(4)
    a, b = pool.allocate(2).tolist()
    assert pool.register_hashes([a], [7]) == 1
    assert pool.register_hashes([b], [7]) == 0
    assert pool.block_hash(b) is None
    pool.drop_ref([b])
    assert pool.num_free == 3  # b freed as plain free space, not cached


def test_hashes_accept_python_hash_values_and_uint64():
    pool = kvttl.BlockPool(3)
    ids = pool.allocate(3)
    pool.register_hashes(ids, [-1, 2**64 - 2, hash(("a", 1))])
    assert pool.block_hash(int(ids[0])) == 2**64 - 1
    assert pool.lookup_prefix(np.array([2**64 - 1], dtype=np.uint64)).tolist() == [0]


def test_evict_drops_cached_content_and_leaves_free_blocks():
    pool = kvttl.BlockPool(3)
    ids = pool.allocate(2).tolist()
    pool.register_hashes(ids[:1], [5])
    pool.drop_ref(ids)
    assert pool.evict([0, 1, 2]) == 1
    assert pool.num_cached == 0 and pool.lookup_prefix([5]).tolist() == []


@pytest.mark.parametrize("form", [list, tuple, lambda x: np.array(x, np.int32), lambda x: np.array(x, np.int64),
                                  lambda x: np.array(x, np.uint16), lambda x: np.repeat(np.array(x, np.int64), 2)[::2]])
def test_id_inputs_in_every_accepted_form(form):
    pool = kvttl.BlockPool(4)
    pool.allocate(3)
    pool.add_ref(form([0, 2]))
    assert [pool.ref_count(b) for b in range(4)] == [2, 1, 2, 0]
    assert pool.drop_ref(form([0, 2])) == 0


def test_generic_iterables_work():
    pool = kvttl.BlockPool(4)
    pool.allocate(2)
    assert pool.drop_ref(range(2)) == 2


# ---- errors: each names what was wrong, and a failed call changes nothing ----------

def expect_error(pool, call, error, *words):
    before = state(pool)
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert state(pool) == before
    pool.check_invariants()


@pytest.fixture
def pool():
    p = kvttl.BlockPool(8)
    ids = p.allocate(4).tolist()
    p.register_hashes(ids[:2], [100, 101])
    p.drop_ref([1])  # 1 is cached; 0, 2, 3 referenced; 4..7 free
    return p


@pytest.mark.parametrize("n", [0, -1, 2**31, 2**40])
def test_bad_pool_sizes(n):
    with pytest.raises(BadArgumentError, match="num_blocks"):
        kvttl.BlockPool(n)


@pytest.mark.parametrize("n", ["4", 2.0, None, [1]])
def test_pool_size_must_be_int(n):
    with pytest.raises(BadArgumentError, match="num_blocks"):
        kvttl.BlockPool(n)


def test_allocate_errors(pool):
    expect_error(pool, lambda: pool.allocate(-1), BadArgumentError, ">= 0", "-1")
    expect_error(pool, lambda: pool.allocate(9), OutOfBlocksError, "9", "8")
    expect_error(pool, lambda: pool.allocate(2.5), BadArgumentError, "float")


def test_out_of_range_ids(pool):
    expect_error(pool, lambda: pool.add_ref([0, 8]), UnknownBlockError, "8", "[0, 8)", "position 1")
    expect_error(pool, lambda: pool.drop_ref([-1]), UnknownBlockError, "-1")
    expect_error(pool, lambda: pool.drop_ref(np.array([2**40])), UnknownBlockError, str(2**40))
    expect_error(pool, lambda: pool.evict([2**63 + 5]), UnknownBlockError)


def test_duplicate_ids_in_one_call(pool):
    expect_error(pool, lambda: pool.add_ref([0, 2, 0]), BadArgumentError, "more than once", "position 2")


def test_referencing_a_free_block(pool):
    expect_error(pool, lambda: pool.add_ref([0, 5]), UnknownBlockError, "block 5 is free")


def test_double_free(pool):
    expect_error(pool, lambda: pool.drop_ref([0, 1]), DoubleFreeError, "block 1", "not referenced")
    expect_error(pool, lambda: pool.drop_ref([6]), DoubleFreeError, "block 6")


def test_lease_references_cannot_be_dropped_by_the_engine(pool):
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0, clock=lambda: 0.0)
    assert table.grant("p", [1], 10.0)
    expect_error(pool, lambda: pool.drop_ref([1]), DoubleFreeError, "held by leases")


def test_register_errors(pool):
    expect_error(pool, lambda: pool.register_hashes([2, 3], [1]), BadArgumentError, "2 block ids but 1 hashes")
    expect_error(pool, lambda: pool.register_hashes([5], [1]), BadArgumentError, "not referenced")
    expect_error(pool, lambda: pool.register_hashes([0], [1]), BadArgumentError, "already holds")
    expect_error(pool, lambda: pool.register_hashes([2], [2**64]), BadArgumentError, "64 bits")
    expect_error(pool, lambda: pool.register_hashes([2], [-(2**63) - 1]), BadArgumentError, "64 bits")


def test_evict_referenced_block(pool):
    expect_error(pool, lambda: pool.evict([1, 0]), BadArgumentError, "block 0 is referenced")


@pytest.mark.parametrize("bad, words", [
    (None, ["NoneType"]), ("01", ["str"]), (b"\x01", ["bytes"]), (5, ["int"]),
    ([1.0], ["float"]), ([True], ["bool"]), ([[0]], ["list"]),
    (np.array([0.0]), ["float64"]), (np.array([True]), ["bool"]), (np.zeros((1, 1), np.int32), ["1-D"]),
])
def test_garbage_id_inputs(pool, bad, words):
    expect_error(pool, lambda: pool.add_ref(bad), BadArgumentError, *words)


def test_queries_check_ids(pool):
    for query in (pool.ref_count, pool.pin_count, pool.block_hash):
        with pytest.raises(UnknownBlockError, match="outside"):
            query(8)


def test_error_hierarchy():
    assert issubclass(BadArgumentError, ValueError) and issubclass(UnknownBlockError, LookupError)
    for cls in (BadArgumentError, UnknownBlockError, DoubleFreeError, OutOfBlocksError, kvttl.InternalError):
        assert issubclass(cls, KvttlError)
