"""Untrusted clients at the kit: tenants, server-side bounds on what hints
may ask, and tables a client cannot grow without bound. Each test is a
finding of the hostile-input review, first as it was reported."""

from __future__ import annotations

import logging

import pytest

from kvttl.errors import BadArgumentError
from kvttl.kit import load_config, read_hints
from kvttl.policy import TurnHints, program_key
from kvttl.policy.estimator import ToolDurationEstimator
from tests.kit.test_kit import finish, hints, kit

log = logging.getLogger("test")


def test_a_program_id_of_another_tenant_is_another_program():
    """A request carrying another program's id dropped and replaced its lease."""
    k, engine, clock = kit()
    k.arrived("a1", hints("agent", tenant="alice"))
    assert finish(k, "a1").granted and k.has_lease("agent", tenant="alice")
    # mallory sends alice's id, as a last turn, then as a new turn
    k.arrived("m1", hints("agent", tenant="mallory", last_turn=True))
    k.admitted("m1", device_hit_tokens=0)
    finish(k, "m1")
    k.arrived("m2", hints("agent", tenant="mallory"))
    k.admitted("m2", device_hit_tokens=0)
    assert finish(k, "m2", blocks=(7, 8)).granted
    lease = k.lease_of("agent", tenant="alice")
    assert lease is not None and lease.num_blocks == 3, "mallory touched alice's lease"
    assert engine.held == {"a1", "m2"}
    # and no tenant-less request reaches either
    k.arrived("n1", hints("agent", last_turn=True))
    finish(k, "n1")
    assert k.has_lease("agent", tenant="alice") and k.has_lease("agent", tenant="mallory")
    k.check_invariants()


def test_a_program_of_another_tenant_does_not_inherit_the_queue_place():
    k, _, clock = kit()
    k.arrived("a1", hints("agent", tenant="alice"), arrival=1.0)
    finish(k, "a1")
    clock.t += 5
    k.arrived("m1", hints("agent", tenant="mallory"), arrival=clock.t)
    assert k.queue_key(program_key("agent", "alice"), clock.t) < k.queue_key(program_key("agent", "mallory"),
                                                                             clock.t)


@pytest.mark.parametrize("client_id", ["\0alice\0sagent", "\0#0123abcd\0i7", "x\x1fy", "tab\there"])
def test_no_client_id_can_spell_a_scoped_key(client_id):
    errors = []
    assert read_hints({"program_id": client_id}, log=log, errors=errors) is None
    assert "control characters" in errors[0]


def test_scoped_keys_are_distinct_for_every_tenant_and_id():
    keys = {program_key(pid, tenant) for tenant in ("", "a", "a\0b", "#x", "\ud800", "t" * 500)
            for pid in ("1", 1, "agent")}
    assert len(keys) == 18
    assert program_key("agent", "") == "agent" and program_key(7) == 7
    long_key = program_key("agent", "t" * 10_000)
    assert len(long_key) < 64 and long_key == program_key("agent", "t" * 10_000)


def test_a_24_hour_hint_is_clamped_to_max_ttl_and_the_response_says_so():
    """Clients chose pins of up to 24 h, honoured by default."""
    k, _, _ = kit("continuum")
    asked = hints("A", ttl_s=86400.0)
    k.arrived("a1", asked)
    outcome = finish(k, "a1")
    assert outcome.granted and outcome.ttl_s == 600.0 and k.lease_of("A").deadline == 100.0 + 600.0
    report = outcome.report(asked)
    assert report["ttl_clamped_from_s"] == 86400.0
    assert any("max_ttl_s" in w for w in report["hint_warnings"])
    k2, _, _ = kit("continuum", max_ttl_s=30.0)
    k2.arrived("b1", hints("B", ttl_s=60.0))
    assert finish(k2, "b1").ttl_s == 30.0


def test_the_policys_own_ttl_is_clamped_too():
    k, _, _ = kit("fixed:1h", max_ttl_s=120.0)
    k.arrived("a1", hints("A"))
    outcome = finish(k, "a1")
    assert outcome.ttl_s == 120.0 and outcome.ttl_clamped_from_s == 0.0


def test_a_fresh_salt_per_program_does_not_buy_a_fresh_pin_share():
    """From review: the share counted by the whole isolation key, so a client
    that picks its own cache_salt got a new share with every salt. It counts
    by the part a gateway vouches for (TurnHints.quota)."""
    k, _, _ = kit(tenant_pinned_share=0.25)
    granted = sum(bool(finish(k, f"m{i}", blocks=(3 * i, 3 * i + 1)).granted)
                  for i in range(10)
                  if k.arrived(f"m{i}", hints("agent", tenant=f"salt{i}\0tenant:team-m", quota="tenant:team-m")))
    assert granted == 4 and k.tenant_pinned_blocks("tenant:team-m") == 8
    k.check_invariants()


def test_one_tenant_cannot_take_more_than_its_pin_share():
    """1000 ids pinned the whole 0.8 cap for 24 h; honest newer leases were revoked first."""
    k, _, _ = kit(tenant_pinned_share=0.25)  # 32 blocks: 8 per tenant
    granted = 0
    for i in range(10):
        k.arrived(f"m{i}", hints(f"id-{i}", tenant="mallory"))
        outcome = finish(k, f"m{i}", blocks=(3 * i, 3 * i + 1))
        granted += outcome.granted
        if not outcome.granted:
            assert outcome.reason == "tenant_cap" and outcome.report()["reason"] == "tenant_cap"
    assert granted == 4 and k.tenant_pinned_blocks("mallory") == 8
    k.arrived("a1", hints("agent", tenant="alice"))
    assert finish(k, "a1", blocks=(30, 31)).granted, "an honest tenant found no room"
    # a replacement is counted net of the lease it replaces
    k.arrived("m0b", hints("id-0", tenant="mallory"))
    k.admitted("m0b", device_hit_tokens=0)
    assert finish(k, "m0b", blocks=(0, 1)).granted
    k.check_invariants()
    assert k.stats["refused"] == 6


def test_a_dormant_program_id_does_not_buy_the_head_of_the_queue():
    """Reusing an old program id put new work at the head of the program-FCFS queue."""
    k, _, clock = kit("continuum", max_queue_jump_prefills=None, max_ttl_s=60.0)
    k.arrived("a1", hints("old"), arrival=clock.t)
    finish(k, "a1")
    k.tick(now=clock.t + 61)
    clock.t += 3600  # an hour later, the same id
    newcomer = k.queue_key(None, clock.t - 30)  # a request that arrived 30 s ago
    k.arrived("a2", hints("old"), arrival=clock.t)
    assert newcomer < k.queue_key("old", clock.t), "the dormant id jumped the queue"
    # an active program (a gap within max_ttl_s) keeps its age
    k.arrived("b1", hints("busy"), arrival=clock.t)
    finish(k, "b1")
    clock.t += 50
    k.arrived("b2", hints("busy"), arrival=clock.t)
    assert k.queue_key("busy", clock.t) < k.queue_key(None, clock.t - 30)


def test_tool_names_cannot_squat_the_estimator():
    """4096 names of 64 KiB held 260 MiB, and squatting folded every new tool into ''."""
    est = ToolDurationEstimator(max_tools=64, window=128, max_samples=1024, min_samples=4)
    for i in range(64):
        est.observe(f"squat-{i}", 1.0)
    for _ in range(8):
        est.observe("pytest", 5.0)
    assert est.tool_mean("pytest") == 5.0 and est.stage("pytest") == "tool"
    for i in range(5000):  # made-up names, far more often than pytest returns
        est.observe(f"flood-{i}", 0.1)
    assert "pytest" in est._tools, "a flood of made-up names pushed out a tool with an estimate of its own"
    assert est.stage("pytest") == "tool" and est.tool_mean("pytest") == 5.0
    assert len(est._tools) <= 64 and est._tool_samples <= 1024
    assert sum(len(w) for w in est._tools.values()) == est._tool_samples


def test_max_ttl_and_tenant_share_are_checked_at_start():
    for bad in ({"max_ttl_s": 0}, {"max_ttl_s": 10**6}, {"max_ttl_s": "1h"}, {"tenant_pinned_share": 1.5}):
        with pytest.raises(BadArgumentError, match=next(iter(bad))):
            load_config(bad)
    assert load_config({"tenant_pinned_share": None})[0].tenant_pinned_share is None


def test_hints_carry_the_tenant_the_engine_gives_not_one_the_client_sends():
    parsed = read_hints({"program_id": "p", "tenant": "alice"}, log=log, tenant="bob")
    assert isinstance(parsed, TurnHints) and parsed.tenant == "bob" and parsed.key == program_key("p", "bob")


def test_aborted_requests_leave_nothing_behind():
    """200k aborted request ids once left 200k entries in a per-request table."""
    k, engine, _ = kit()
    for i in range(20_000):
        k.arrived(f"r{i}", hints(f"p{i % 7}", tenant=f"t{i % 3}"))
        if i % 2:
            k.admitted(f"r{i}", device_hit_tokens=0)
        k.finished(f"r{i}", blocks=[1], num_tokens=20, free_blocks=20, aborted=True)
    assert k.num_turns_in_flight == 0 and len(k.programs) == 0 and k.num_leases == 0
    assert not engine.held
    k.check_invariants()


def test_bad_hint_warnings_are_rate_limited(caplog):
    """A client that sends garbage on every request must not flood the log."""
    from kvttl.kit import WarningBudget

    clock = [0.0]
    budget = WarningBudget(burst=3, per_s=60.0, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="test"):
        for i in range(1000):
            budget.warn(log, "bad hint %d", i)
        assert [r.getMessage() for r in caplog.records] == ["bad hint 0", "bad hint 1", "bad hint 2"]
        clock[0] = 61.0
        budget.warn(log, "bad hint %d", 1000)
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "kvttl: 997 more hint warnings were suppressed in the last 60 s", "bad hint 1000"]


def test_read_hints_warns_through_the_budget(caplog):
    from kvttl.kit import HINT_WARNINGS

    with caplog.at_level(logging.WARNING, logger="test"):
        for _ in range(50):
            read_hints({"program_id": ["x"]}, log=log)
    assert len(caplog.records) == HINT_WARNINGS.burst
