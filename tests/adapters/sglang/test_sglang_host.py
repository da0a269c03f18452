"""The SGLang backend's host tier (issue #15 item 1) on SGLang 0.5.23's own
classes: an expired or revoked lease goes to host memory, and the returning
turn reloads it instead of re-prefilling. Before it, the lease was dropped:
the config key did not exist and the turn re-prefilled from nothing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvttl.errors import BadArgumentError
from tests.adapters.sglang.harness import (
    FakeClock, Turn, assert_no_leak, kv_matches, make_cache, make_kv_hints, run_turn, tokens, write_kv,
)

HOST = {"host_tier_blocks": 256}


def _agent_turn(cache, prompt, n_out=8, **hints):
    turn = Turn(cache, prompt, n_out, hints=make_kv_hints(**hints)).arrive().admit()
    write_kv(turn)
    return turn.finish()


def _pressure(cache, seeds, n=40):
    for s in seeds:
        run_turn(cache, tokens(s, n), 8)


def _back(cache, first, program, **kw):
    return Turn(cache, first.context + tokens(99, 10), 8, hints=make_kv_hints(program, **kw)).arrive()


def _no_leak(cache):
    cache.release_all_leases()
    assert_no_leak(cache)
    if cache.host is not None:
        assert cache.host.index.pool.num_referenced == 0, "host slots still referenced"


@pytest.mark.parametrize("config, expect", [({}, 0), (HOST, 48)])
def test_an_expired_lease_comes_back_from_host_memory_bit_exact(config, expect):
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config=config)
    first = _agent_turn(cache, tokens(1, 40), program_id="A", ttl="10s")
    clock.t += 10.5
    _pressure(cache, range(2, 8))  # expires the lease, then evicts its pages
    assert cache.stats["expired"] == 1
    back = _back(cache, first, "A", ttl="10s")
    assert back.prefix_len == expect
    if expect:
        slot_bytes = cache.host.copier.slot_bytes
        assert cache.stats["offloaded_bytes"] == 48 * slot_bytes
        assert cache.stats["reloaded_bytes"] == 48 * slot_bytes
        assert kv_matches(cache, cache.path_device_indices(back.req.last_node)[:48], first.context[:48])
    back.admit().finish()
    _no_leak(cache)


def test_a_reload_behind_a_prefix_still_on_the_device_frees_none_of_the_trees_slots():
    """Review finding: with part of the context still on the device (here a
    prefix another program's lease holds), SGLang's insert frees the value
    slots of the part it already has unless told where the request's own
    prefix ends; the reload handed it the tree's own slots, which went back
    to the free list while still locked and in use."""
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config=HOST)
    shared = tokens(1, 20)
    b = _agent_turn(cache, shared + tokens(2, 10), program_id="B", ttl="60s")  # pins the shared prefix
    a = _agent_turn(cache, shared + tokens(3, 30), program_id="A", ttl="1s")
    clock.t += 2
    _pressure(cache, range(4, 8))  # A's lease expires (copied out); its own tail is evicted, B's path stays
    back = _back(cache, a, "A", ttl="1s")
    assert back.prefix_len == len(a.context)  # 20 on the device + the rest from the host
    assert kv_matches(cache, cache.path_device_indices(back.req.last_node)[:len(a.context)], a.context)
    back.admit()
    assert kv_matches(cache, cache.path_device_indices(back.req.last_node)[:20], shared)
    back.finish()
    allocator = cache.token_to_kv_pool_allocator
    assert allocator.available_size() + cache.evictable_size() + cache.protected_size() == allocator.size
    b_back = _back(cache, b, "B", ttl="60s")
    assert b_back.prefix_len == len(b.context)
    assert kv_matches(cache, cache.path_device_indices(b_back.req.last_node)[:len(b.context)], b.context)
    b_back.admit().finish()
    _no_leak(cache)


def test_a_revoked_lease_is_copied_out_before_its_pages_go():
    cache = make_cache(tokens=128, config={**HOST, "policy": "fixed:1h"})
    first = _agent_turn(cache, tokens(1, 40), program_id="A")
    _pressure(cache, range(2, 5), n=100)  # a turn that needs the whole pool: the lease must go
    assert cache.stats["revoked"] == 1 and cache.num_leases == 0
    back = _back(cache, first, "A")
    assert back.prefix_len == 48
    assert kv_matches(cache, cache.path_device_indices(back.req.last_node)[:48], first.context[:48])
    back.admit().finish()
    _no_leak(cache)


def test_a_turn_without_a_lease_is_copied_as_it_finishes():
    """The default offload mode, on_unpin: a turn the policy does not pin goes to host at once."""
    cache = make_cache(tokens=128, config={**HOST, "policy": "fixed:0s"})
    first = _agent_turn(cache, tokens(1, 40), program_id="A")
    assert cache.stats["granted"] == 0 and cache.stats["offloaded_bytes"] > 0
    _pressure(cache, range(2, 8))
    back = _back(cache, first, "A")
    assert back.prefix_len == 48
    back.admit().finish()
    _no_leak(cache)


@pytest.mark.parametrize("broken", ["offload", "reload"])
def test_a_failed_copy_costs_a_re_prefill_never_a_request(broken, monkeypatch):
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config=HOST)
    first = _agent_turn(cache, tokens(1, 40), program_id="A", ttl="10s")

    def fail(*args, **kwargs):
        raise RuntimeError("copy engine fault")

    monkeypatch.setattr(cache.host.copier.engine, broken, fail)
    clock.t += 10.5
    _pressure(cache, range(2, 8))
    back = _back(cache, first, "A", ttl="10s")
    assert back.prefix_len == 0
    assert cache.stats["copy_failures"] == 1
    assert cache.host.index.num_filled == 0  # the failed copy is forgotten, whichever way it failed
    back.admit().finish()
    monkeypatch.undo()
    _no_leak(cache)
    again = _back(cache, back, "A")  # the forgotten copy is never found, a later good one is
    assert again.prefix_len == len(back.context)
    again.admit().finish()
    _no_leak(cache)


def test_tenants_never_share_host_copies():
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config=HOST)
    turn = Turn(cache, tokens(1, 40), 8, hints=make_kv_hints("A", ttl="1s"), cache_salt="alice").arrive().admit()
    write_kv(turn)
    turn.finish()
    clock.t += 2
    _pressure(cache, range(2, 8))
    other = Turn(cache, turn.context + tokens(99, 10), 8, hints=make_kv_hints("A"), cache_salt="bob").arrive()
    assert other.prefix_len == 0
    other.admit().finish()
    mine = Turn(cache, turn.context + tokens(99, 10), 8, hints=make_kv_hints("A"), cache_salt="alice").arrive()
    assert mine.prefix_len == 48
    mine.admit().finish()
    _no_leak(cache)


@pytest.mark.parametrize("config, message", [
    ({"host_tier_blocks": -1}, "host_tier_blocks"),
    ({"host_tier_gib": "1GB"}, "host_tier_gib"),
    ({"host_tier_gib": 1, "host_tier_blocks": 8}, "not both"),
])
def test_bad_host_tier_config_fails_at_start_naming_the_key(config, message):
    with pytest.raises(BadArgumentError, match=message):
        make_cache(config=config)


def test_host_tier_size_in_gib_counts_one_page_of_every_layer():
    cache = make_cache(config={"host_tier_gib": 2**-10})  # 1 MiB
    slot = 2 * 2 * 2 * 4 * 2  # K and V x 2 layers x 2 heads x 4 dims x fp16, one token per page
    assert cache.host.copier.slot_bytes == slot
    assert cache.host.index.pool.capacity == 2**20 // slot


def test_hicache_and_the_host_tier_are_not_both_on():
    cache = make_cache(config=HOST)
    with pytest.raises(BadArgumentError, match="HiCache"):
        cache.init_hicache(None, None)


def _tp_rank(rank, world, port, broken_rank, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config=HOST, tp_group=dist.group.WORLD)
    if rank == broken_rank:
        def fail(*args, **kwargs):
            raise RuntimeError("copy engine fault on one rank")

        cache.host.copier.engine.offload = fail
    first = _agent_turn(cache, tokens(1, 40), program_id="A", ttl="10s")
    clock.t += 10.5
    _pressure(cache, range(2, 8))
    back = _back(cache, first, "A", ttl="10s")
    results[rank] = (back.prefix_len, cache.stats["copy_failures"], cache.host.index.num_filled)
    back.admit().finish()
    dist.destroy_process_group()


@pytest.mark.parametrize("broken_rank, prefix", [(None, 48), (1, 0)])
def test_every_tp_rank_takes_the_same_host_tier_decisions(broken_rank, prefix):
    """Two ranks over gloo. A copy that fails on one rank only counts as failed
    on both: otherwise rank 0 would reload a prefix rank 1 re-prefills, and
    their trees (and batches) would differ."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # a forked manager can inherit a held lock and hang
    mp.spawn(_tp_rank, args=(2, port, broken_rank, results), nprocs=2, join=True)
    assert results[0] == results[1], (results[0], results[1])
    assert results[0][0] == prefix


_step = st.one_of(
    st.tuples(st.just("turn"), st.integers(0, 3), st.sampled_from(["2s", "20s", None]), st.booleans()),
    st.tuples(st.just("traffic"), st.integers(10, 90)),
    st.tuples(st.just("wait"), st.floats(0.0, 15.0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=1, max_size=25))
def test_random_agent_traffic_with_a_host_tier_reloads_only_true_kv_and_leaks_nothing(steps):
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config={"host_tier_blocks": 96, "policy": "fixed:8s"})
    last = {}
    seed = iter(range(10, 10_000))
    for step in steps:
        if step[0] == "turn":
            _, p, ttl, last_turn = step
            prompt = (last[p].context if p in last else tokens(next(seed), 20)) + tokens(next(seed), 6)
            if len(prompt) > 100:
                prompt, last_turn = tokens(next(seed), 20), True
            turn = Turn(cache, prompt, 5, hints=make_kv_hints(p, ttl=ttl, last_turn=last_turn)).arrive()
            matched = turn.prefix_len
            turn.admit()
            if matched:  # whatever came from the device or the host is the KV of these tokens
                assert kv_matches(cache, cache.path_device_indices(turn.req.last_node)[:matched], prompt[:matched])
            write_kv(turn)
            turn.finish()
            last.pop(p, None) if last_turn else last.__setitem__(p, turn)
        elif step[0] == "traffic":
            t = Turn(cache, tokens(next(seed), step[1]), 8).arrive().admit()
            write_kv(t)
            t.finish()
        else:
            clock.t += step[1]
        cache.tick()
        assert cache.host.index.pool.num_referenced == 0
    _no_leak(cache)

