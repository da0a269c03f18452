"""The host tier's index (``kvttl.kit.HostIndex``), content hashes for
engines without block hashes, and the size check every adapter uses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvttl.errors import BadArgumentError
from kvttl.kit import HostIndex, host_tier_slots, page_hashes


def chain(name: bytes, n: int) -> list[bytes]:
    """n distinct 32-byte block hashes (distinct in their first 8 bytes too)."""
    return [bytes([i]) + name * 31 for i in range(n)]


def test_host_index_copies_only_what_is_missing_and_evicts_least_recently_used():
    host = HostIndex(8)
    a, b = chain(b"a", 5), chain(b"b", 5)
    assert host.offload([10, 11, 12], a[:3]) == 3
    offloads, reloads = host.take()
    assert [blk for blk, _ in offloads] == [10, 11, 12] and not reloads
    assert host.offload([10, 11, 12, 13, 14], a) == 2  # the first three are there already
    assert [blk for blk, _ in host.take()[0]] == [13, 14]
    assert host.offload([20, 21, 22, 23, 24], b) == 5  # 8 slots: three free, then the two oldest go
    host.take()
    assert host.pool.num_referenced == 0 and host.num_filled == 8
    slots = host.match(a)
    assert len(slots) == 3, "eviction must take a context's tail first and keep its prefix"
    host.release(slots)
    slots = host.match(b[:3])
    assert len(slots) == 3
    host.release(slots)
    assert host.pool.num_referenced == 0


def test_host_index_never_matches_a_truncated_hash_collision():
    host = HostIndex(4)
    real = [b"k" * 8 + b"1" * 24]
    host.offload([1], real)
    host.take()
    impostor = [b"k" * 8 + b"2" * 24]  # the same 64 bits the pool indexes, other content
    assert host.match(impostor) == []
    assert host.pool.num_referenced == 0
    slots = host.match(real)
    assert slots != []
    host.release(slots)
    # a chain whose blocks all collide with the first: one slot, found once
    repeated = [b"k" * 8 + bytes([i]) * 24 for i in range(3)]
    assert host.match(repeated) == [] and host.pool.num_referenced == 0


def test_host_index_forgets_failed_copies():
    host = HostIndex(4)
    hashes = chain(b"f", 3)
    host.offload([1, 2, 3], hashes)
    slots = [s for _, s in host.take()[0]]
    host.forget(slots)
    assert host.match(hashes) == [] and host.num_filled == 0


def test_host_index_reset_forgets_everything_unless_a_copy_is_queued():
    host = HostIndex(4)
    hashes = chain(b"r", 3)
    host.offload([1, 2, 3], hashes)
    assert host.reset() is False  # this step's copies hold their slots: refused, nothing lost
    host.take()
    assert host.reset() is True
    assert host.match(hashes) == [] and host.num_filled == 0 and host.pool.num_free == 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["offload", "match", "forget"]), st.integers(0, 5), st.integers(1, 6)),
                max_size=40))
def test_host_index_never_returns_other_content_and_leaks_no_reference(ops):
    """Random traffic over six contexts and a 10-slot tier: every matched slot
    holds exactly the hash asked for, matches are prefixes, and once every
    step's copies are taken nothing stays referenced."""
    host = HostIndex(10)
    contexts = [chain(bytes([65 + c]), 6) for c in range(6)]
    written: dict[int, bytes] = {}  # what the worker would have copied into each slot
    for op, c, n in ops:
        hashes = contexts[c][:n]
        if op == "offload":
            host.offload(list(range(100 * c, 100 * c + n)), hashes)
            for block, slot in host.take()[0]:
                written[slot] = contexts[block // 100][block % 100]
        elif op == "match":
            slots = host.match(hashes)
            assert [written[s] for s in slots] == hashes[:len(slots)]
            host.release(slots)
        else:
            slots = host.match(hashes)
            host.release(slots)
            host.forget(slots)
            assert host.match(hashes[:1]) == [] or not slots
        assert host.pool.num_referenced == 0
        host.pool.check_invariants()


def test_a_failed_copy_of_held_slots_is_freed_once_they_are_let_go():
    """Issue #15: a reload that failed while its slots were still held (the
    SGLang backend holds them through the copy) left them filled forever."""
    host = HostIndex(4)
    hashes = chain(b"h", 3)
    host.offload([1, 2, 3], hashes)
    host.take()
    slots = host.match(hashes)
    host.forget(slots)
    assert host.match(hashes) == []
    host.release(slots)
    assert host.num_filled == 0 and host.pool.num_free == 4
    host.pool.check_invariants()


def test_page_hashes_name_a_prefix_the_same_whatever_follows_it():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # full pages only
    assert page_hashes([1, 2, 3, 4, 9, 9], 2)[:2] == a[:2]
    assert page_hashes([1, 2, 3, 4], 2, "tenant-b") != a[:2]
    assert page_hashes([0, 2, 3, 4], 2)[1] != a[1]  # a page's hash covers everything before it
    assert page_hashes([], 4) == []
    with pytest.raises(BadArgumentError, match="page_size"):
        page_hashes([1], 0)


@pytest.mark.parametrize("extra, message", [
    ({"host_tier_blocks": -1}, "host_tier_blocks"),
    ({"host_tier_blocks": True}, "host_tier_blocks"),
    ({"host_tier_gib": float("inf")}, "host_tier_gib"),
    ({"host_tier_gib": 1, "host_tier_blocks": 8}, "not both"),
    ({"host_tier_gib": 1}, "block size"),
])
def test_bad_host_tier_sizes_name_the_key(extra, message):
    with pytest.raises(BadArgumentError, match=message):
        host_tier_slots(extra, None)


def test_host_tier_size_in_gib_is_whole_blocks():
    assert host_tier_slots({"host_tier_gib": 1}, 3 * 2**20) == 341
    assert host_tier_slots({}, 10) == 0
