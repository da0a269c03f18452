"""kvttl's radix-cache backend on SGLang 0.5.23's own classes (CPU pools, no model)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adapters.sglang.harness import (
    FakeClock, Turn, assert_no_leak, make_cache, make_kv_hints, run_turn, tokens,
)


def _pressure(cache, seeds, n=40):
    """Single-turn traffic without hints: it needs the whole pool over time."""
    for s in seeds:
        run_turn(cache, tokens(s, n), 8)


def _return_turn(cache, first, program, **kw):
    """The program's next turn: its whole previous context plus the tool output."""
    return Turn(cache, first.context + tokens(99, 10), 8, hints=make_kv_hints(program, **kw))


def test_leased_prefix_survives_pressure_that_evicts_it_on_plain_sglang():
    hits = {}
    for kind in ("sglang", "kvttl"):
        cache = make_cache(kind, tokens=128)
        first = run_turn(cache, tokens(1, 40), 8, program_id="A", tool="bash", ttl="30s")
        _pressure(cache, range(2, 8))
        back = _return_turn(cache, first, "A", tool="bash", ttl="30s").arrive()
        hits[kind] = back.prefix_len
        back.admit().finish()
        if kind == "kvttl":
            cache.release_all_leases()
        assert_no_leak(cache)
    assert hits["sglang"] == 0
    assert hits["kvttl"] == 48  # the whole previous context: 40 prompt + 8 output tokens


def test_lease_is_handed_over_only_after_the_returning_turn_holds_its_lock():
    cache = make_cache(tokens=128)
    first = run_turn(cache, tokens(1, 40), 8, program_id="A", ttl="30s")
    back = _return_turn(cache, first, "A", ttl="30s").arrive()
    assert cache.stats["hit"] == 1 and cache.num_leases == 1
    assert cache.lease_of("A").deadline == float("inf")  # no expiry while the turn waits
    cache.tick()
    assert cache.num_leases == 1  # not admitted yet: still held
    back.admit()
    cache.tick()
    assert cache.num_leases == 0 and cache.stats["released"] == 1
    assert cache.protected_size() == len(first.context)  # the turn's own lock on its matched prefix
    back.finish()
    assert cache.num_leases == 1 and cache.stats["granted"] == 2
    cache.release_all_leases()
    assert_no_leak(cache)


def test_expired_lease_is_evicted_and_the_next_turn_re_prefills():
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock)
    first = run_turn(cache, tokens(1, 40), 8, program_id="A", ttl="10s")
    clock.t += 10.5
    _pressure(cache, range(2, 8))
    assert cache.stats["expired"] == 1 and cache.num_leases == 0
    back = _return_turn(cache, first, "A", ttl="10s").arrive()
    assert back.prefix_len == 0
    back.admit().finish(abort=True)
    assert_no_leak(cache)


def test_lease_does_not_expire_early():
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock)
    first = run_turn(cache, tokens(1, 40), 8, program_id="A", ttl="10s")
    clock.t += 9.9
    _pressure(cache, range(2, 5))
    assert cache.num_leases == 1 and cache.stats["expired"] == 0
    assert _return_turn(cache, first, "A").arrive().prefix_len == 48


def test_last_turn_and_abort_are_not_pinned():
    cache = make_cache(tokens=128)
    run_turn(cache, tokens(1, 40), 8, program_id="A", ttl="30s", last_turn=True)
    assert cache.num_leases == 0 and cache.stats["granted"] == 0
    run_turn(cache, tokens(2, 40), 8, program_id="B", ttl="30s")
    assert cache.num_leases == 1
    Turn(cache, tokens(3, 20), 4, hints=make_kv_hints("B", ttl="30s")).arrive().admit().finish(abort=True)
    assert cache.num_leases == 0 and cache.stats["released"] == 1
    assert_no_leak(cache)


def test_pins_never_make_an_allocation_fail():
    """Leases over most of the pool; a request that needs it all still gets it
    (kvttl revokes, latest program first) where plain SGLang would too."""
    cache = make_cache(tokens=128, config={"pinned_share_cap": 1.0})
    for i, program in enumerate("ABC"):
        run_turn(cache, tokens(i + 1, 30), 6, program_id=program, ttl="60s")
    assert cache.num_leases == 3 and cache.protected_size() == 108
    run_turn(cache, tokens(9, 80), 8)  # 88 slots: 20 free + two revoked pins
    assert cache.stats["revoked"] == 2
    assert [lease.owner for lease in cache.kit.leases()] == ["A"]  # the oldest program kept its pin
    cache.release_all_leases()
    assert_no_leak(cache)


def test_head_of_queue_revokes_only_later_programs_while_work_runs():
    class Running:
        def __init__(self, empty):
            self.empty = empty

        def is_empty(self):
            return self.empty

    cache = make_cache(tokens=128)
    clock = cache._clock
    run_turn(cache, tokens(1, 30), 6, program_id="old", ttl="60s")
    clock.t += 1
    newcomer = Turn(cache, tokens(5, 100), 8, hints=make_kv_hints("mid", ttl="60s")).arrive()
    clock.t += 1
    run_turn(cache, tokens(2, 30), 6, program_id="late", ttl="60s")
    assert cache.num_leases == 2
    newcomer.arrive()
    cache.relieve_pressure([newcomer.req], Running(empty=False))
    assert [lease.owner for lease in cache.kit.leases()] == ["old"]  # "late" arrived after "mid"
    cache.relieve_pressure([newcomer.req], Running(empty=False))
    assert cache.num_leases == 1  # "old" is older than the head: it stays while work runs
    cache.relieve_pressure([newcomer.req], Running(empty=True))
    assert cache.num_leases == 0  # nothing runs: any pin may go, so the engine never stalls
    newcomer.admit().finish()
    cache.release_all_leases()
    assert_no_leak(cache)


def test_a_head_without_a_program_revokes_a_pin_it_has_waited_out():
    """Issue #17: a plain request arrived after every pinned program, so under
    program FCFS it could revoke no pin while work ran and waited for expiry.
    Once it has waited longer than the pinned program could jump the queue
    (here 5 s), the pin goes; before that it stays."""
    class Running:
        def is_empty(self):
            return False

    cache = make_cache(tokens=128, config={"max_queue_jump_s": 5.0, "max_queue_jump_prefills": None})
    run_turn(cache, tokens(1, 30), 6, program_id="old", ttl="60s")
    clock = cache._clock  # the harness stamps queue entries on it too
    clock.t += 1.0
    plain = Turn(cache, tokens(5, 100), 8).arrive()
    clock.t += 1.0
    cache.relieve_pressure([plain.req], Running())
    assert cache.num_leases == 1
    clock.t += 9.0
    cache.relieve_pressure([plain.req], Running())
    assert cache.num_leases == 0 and cache.stats["revoked"] == 1
    plain.admit().finish()
    assert_no_leak(cache)


def test_pinned_share_cap_refuses_a_lease_that_would_pin_too_much():
    cache = make_cache(tokens=128, config={"pinned_share_cap": 0.25})
    run_turn(cache, tokens(1, 30), 6, program_id="A", ttl="60s")  # 36 of 130 pages: over 25%
    assert cache.num_leases == 0 and cache.stats["refused"] == 1
    run_turn(cache, tokens(2, 20), 4, program_id="B", ttl="60s")  # 24 pages: fits
    assert cache.num_leases == 1
    cache.release_all_leases()
    assert_no_leak(cache)


@pytest.mark.parametrize("payload, expect", [
    ({"program_id": ["not", "an", "id"]}, "program_id must be"),
    ({"program_id": ""}, "empty string"),
    ({"program_id": 2**70}, "64 bits"),
    ({"program_id": "A", "ttl": "-5s"}, "ttl ignored"),
    ({"program_id": "A", "ttl": "forever"}, "ttl ignored"),
])
def test_bad_hints_are_ignored_with_a_warning(payload, expect, caplog):
    cache = make_cache(tokens=128)
    hints = {"protocol_version": "1", "message_id": "m",
             "actions": [{"action_id": "k", "action_type": "kvttl.turn", "action_version": "1", "payload": payload}]}
    with caplog.at_level(logging.WARNING, logger="kvttl.sglang"):
        turn = Turn(cache, tokens(1, 30), 4, hints=hints).arrive().admit().finish()
    assert expect in caplog.text
    assert turn.req.finished()
    cache.release_all_leases()
    assert_no_leak(cache)


def test_requests_without_hints_behave_as_plain_sglang():
    plain, ours = make_cache("sglang", tokens=96), make_cache(tokens=96)
    for cache in (plain, ours):
        for s in [1, 2, 1, 3, 2, 4, 1]:
            run_turn(cache, tokens(s, 30), 5)
    assert not any(ours.stats.values()) and ours.num_leases == 0
    assert ours.evictable_size() == plain.evictable_size()
    assert ours.token_to_kv_pool_allocator.available_size() == plain.token_to_kv_pool_allocator.available_size()


def test_bad_config_fails_at_start_naming_the_key():
    from kvttl.errors import KvttlError
    from kvttl_sglang.cache import load_config

    with pytest.raises(KvttlError, match="unknown key"):
        load_config('{"ttl": "5m"}')
    with pytest.raises(KvttlError, match="pinned_share_cap"):
        load_config('{"pinned_share_cap": 3}')
    with pytest.raises(KvttlError, match="not JSON"):
        load_config("{ttl_policy: continuum}")
    with pytest.raises(KvttlError, match="nope"):
        load_config('{"ttl_policy": "nope"}')
    assert load_config("").policy == "continuum"
    with pytest.raises(KvttlError, match="tenant_field is for vLLM"):  # SGLang's tenant is its extra_key
        make_cache(tokens=64, config={"tenant_field": "tenant"})


# ---- property: random agent traffic --------------------------------------------------------

_step = st.one_of(
    st.tuples(st.just("turn"), st.integers(0, 3), st.sampled_from(["5s", "20s", None]), st.booleans()),
    st.tuples(st.just("traffic"), st.integers(10, 90)),
    st.tuples(st.just("wait"), st.floats(0.0, 15.0)),
    st.tuples(st.just("abort"), st.integers(0, 3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=1, max_size=30))
def test_random_agent_traffic_keeps_every_live_lease_and_leaks_nothing(steps):
    """Whatever the traffic: a live lease's program matches its whole last context,
    an allocation never fails because of pins, and draining leaves nothing locked."""
    clock = FakeClock()
    cache = make_cache(tokens=128, rows=8, clock=clock, config={"policy": "fixed:8s", "pinned_share_cap": 1.0})
    last = {}  # program -> its last finished Turn
    seed = iter(range(10, 10_000))
    for step in steps:
        if step[0] == "turn":
            _, p, ttl, last_turn = step
            prompt = (last[p].context if p in last else tokens(next(seed), 20)) + tokens(next(seed), 6)
            if len(prompt) > 100:
                prompt, last_turn = tokens(next(seed), 20), True
            turn = Turn(cache, prompt, 5, hints=make_kv_hints(p, ttl=ttl, last_turn=last_turn)).arrive()
            lease = cache.lease_of(p)
            if p in last and lease is not None:
                assert turn.prefix_len == len(last[p].context), "a live lease lost its prefix"
            turn.admit().finish()
            if last_turn:
                last.pop(p, None)
                assert cache.lease_of(p) is None
            else:
                last[p] = turn
        elif step[0] == "traffic":
            run_turn(cache, tokens(next(seed), step[1]), 8)
        elif step[0] == "wait":
            clock.t += step[1]
        else:
            p = step[1]
            Turn(cache, tokens(next(seed), 8), 2, hints=make_kv_hints(p)).arrive().admit().finish(abort=True)
            last.pop(p, None)
            assert cache.lease_of(p) is None
        cache.tick()  # what every scheduling pass does
        assert all(lease.deadline > clock.t for lease in cache.kit.leases()), "a due lease survived a tick"
        assert all(lease.owner in last for lease in cache.kit.leases()), "a lease outlived its program's last turn"
    cache.release_all_leases()
    assert cache.num_leases == 0
    assert_no_leak(cache)


def test_a_retracted_turn_is_not_a_finished_one():
    """SGLang retracts (preempts) by releasing an unfinished request's KV: that is no turn end."""
    from sglang.srt.mem_cache.common import release_kv_cache

    cache = make_cache(tokens=128)
    first = run_turn(cache, tokens(1, 30), 4, program_id="A", ttl="60s")
    back = _return_turn(cache, first, "A", ttl="60s").arrive().admit()
    release_kv_cache(back.req, cache, checkpoint=False)  # retract: back to the waiting queue
    assert cache.kit.programs.get("A").num_turns == 1 and cache.stats["granted"] == 1
    back.req.kv.cache_protected_len = 0
    back.admit().finish()
    assert cache.kit.programs.get("A").num_turns == 2 and cache.stats["granted"] == 2
    cache.release_all_leases()
    assert_no_leak(cache)


def test_a_bad_hint_warns_once_however_often_the_request_is_looked_at(caplog):
    cache = make_cache(tokens=128)
    hints = make_kv_hints("A", ttl="eventually")
    turn = Turn(cache, tokens(1, 30), 4, hints=hints)
    with caplog.at_level(logging.WARNING, logger="kvttl.sglang"):
        for _ in range(5):  # every scheduling pass matches and sorts the waiting queue again
            turn.arrive()
            cache.queue_key(turn.req)
        turn.admit().finish()
    assert caplog.text.count("ttl ignored") == 1
    cache.release_all_leases()
    assert_no_leak(cache)


def test_the_response_says_why_a_turn_holds_no_lease():
    """Issue #17 item 6 on SGLang: there was no response field for the lease
    (only ``req._kvttl_outcome``). The report rides on SGLang's
    ``customized_info``, which reaches the client as ``meta_info["kvttl"]``."""
    cache = make_cache(tokens=256, config={"pinned_share_cap": 0.1})  # at most 25 tokens pinned
    granted = run_turn(cache, tokens(1, 10), 4, program_id="A", ttl="30s").req
    (report,) = granted.customized_info["kvttl"]
    assert report["lease_granted"] is True and report["ttl_s"] == 30.0
    assert report["lease_id"] == granted._kvttl_outcome.lease_id and report["num_blocks"] == 14
    capped = run_turn(cache, tokens(2, 40), 4, program_id="B", ttl="30s").req
    (report,) = capped.customized_info["kvttl"]
    assert report["lease_granted"] is False and report["reason"] == "cap"
    last = run_turn(cache, tokens(3, 10), 4, program_id="C", last_turn=True).req
    assert last.customized_info["kvttl"][0]["reason"] == "last_turn"
    bad = Turn(cache, tokens(4, 10), 4, hints=make_kv_hints("D", ttl="forever")).arrive().admit().finish().req
    (warning,) = bad.customized_info["kvttl"][0]["hint_warnings"]
    assert warning.startswith("ttl ignored") and "forever" in warning
    hints = {"protocol_version": "1", "message_id": "m",
             "actions": [{"action_id": "k", "action_type": "kvttl.turn", "action_version": "1",
                          "payload": {"program_id": ["x"]}}]}
    unusable = Turn(cache, tokens(5, 10), 4, hints=hints).arrive().admit().finish().req
    (report,) = unusable.customized_info["kvttl"]
    assert report["reason"] == "hint_invalid" and "program_id" in report["hint_errors"][0]
    plain = Turn(cache, tokens(6, 10), 4).arrive().admit().finish().req
    assert plain.customized_info is None  # no kvttl hints: the response is SGLang's own
    cache.release_all_leases()
    assert_no_leak(cache)
