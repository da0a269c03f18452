"""The engine kit on its own: a fake engine that records what the kit asks
of it. (Every integration runs the shared scenarios in tests/conformance.)"""

from __future__ import annotations

import logging
import math

import pytest

from kvttl.errors import BadArgumentError
from kvttl.kit import (DeadlineWaker, EngineKit, KitConfig, ProgramTable, hint_report, load_config, make_kv_hints,
                       payload_from_envelope, read_hints)
from kvttl.policy import FixedTTL, SchedulingPolicy, TurnHints, program_fcfs


class Engine:
    """EngineHooks that log every call; its memory is block ids 0..N."""

    def __init__(self, *, fail_pin=False):
        self.calls = []
        self.fail_pin = fail_pin
        self.held = set()

    def pin(self, ref):
        if self.fail_pin:
            raise RuntimeError("the engine could not take its hold")
        self.calls.append(("pin", ref))
        self.held.add(ref)
        return ref

    def unpin(self, handle, *, reason, copy_out):
        self.calls.append(("unpin", handle, reason, copy_out))
        self.held.discard(handle)

    def copy_out(self, ref):
        self.calls.append(("copy_out", ref))


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def kit(policy="fixed:10s", *, host=False, engine=None, **config):
    clock = Clock()
    engine = engine or Engine()
    k = EngineKit(engine, num_blocks=32, block_size=16, config=KitConfig(policy=policy, **config), clock=clock,
                  has_host_tier=host)
    return k, engine, clock


def hints(program, **kw):
    return TurnHints(program_id=program, **kw)


def finish(k, key, blocks=(1, 2, 3), **kw):
    return k.finished(key, blocks=list(blocks), num_tokens=16 * len(blocks) + 5, free_blocks=20, pin_ref=key, **kw)


def test_the_lifecycle_grant_hand_over_and_release():
    k, engine, clock = kit()
    assert k.arrived("r1", None) is None  # no program: nothing recorded
    k.arrived("a1", hints("A"))
    k.admitted("a1", device_hit_tokens=0)
    outcome = finish(k, "a1")
    assert outcome.granted and outcome.ttl_s == 10.0 and outcome.num_blocks == 3
    assert engine.held == {"a1"} and k.has_lease("A")
    clock.t += 4
    k.arrived("a2", hints("A"))  # back from the tool: a hit, held while it waits
    assert k.stats["hit"] == 1 and k.lease_of("A").deadline == math.inf
    k.admitted("a2", device_hit_tokens=48)
    assert engine.calls[-1] == ("unpin", "a1", "released", False) and not k.has_lease("A")
    assert finish(k, "a2", blocks=(1, 2, 3, 4)).granted
    k.arrived("a3", hints("A", last_turn=True))
    k.admitted("a3", device_hit_tokens=64)
    assert finish(k, "a3").reason == "last_turn"
    assert "A" not in k.programs and not engine.held
    k.check_invariants()


def test_expiry_and_revocation_drop_the_engines_hold_with_the_reason():
    k, engine, clock = kit(host=True, offload="on_unpin")
    for i, program in enumerate("ABC"):
        k.arrived(f"{program}1", hints(program), arrival=float(i))
        k.admitted(f"{program}1", device_hit_tokens=0)
        finish(k, f"{program}1", blocks=(3 * i, 3 * i + 1))
    gone = k.revoke(num_leases=1)  # fixed:<ttl> revokes as Continuum does: the latest program first
    assert [lease.owner for lease in gone] == ["C"]
    assert ("unpin", "C1", "revoked", True) in engine.calls  # copied out before it can be evicted
    clock.t += 11
    expired = k.tick()
    assert sorted(lease.owner for lease in expired) == ["A", "B"] and k.stats["expired"] == 2
    assert not engine.held
    k.check_invariants()


def test_a_router_that_moves_a_program_releases_its_lease_without_a_copy():
    k, engine, clock = kit(host=True, offload="on_unpin")
    k.arrived("a1", hints("A"))
    k.admitted("a1", device_hit_tokens=0)
    finish(k, "a1")
    assert k.release("A") is True
    assert engine.calls[-1] == ("unpin", "a1", "released", False) and not k.has_lease("A")
    assert k.release("A") is False and k.release("nobody") is False
    assert k.stats["released"] == 1
    k.check_invariants()


def test_later_programs_may_not_revoke_earlier_ones_unless_nothing_runs():
    k, engine, _ = kit()
    k.arrived("old1", hints("old"), arrival=1.0)
    finish(k, "old1")
    k.arrived("new1", hints("new"), arrival=5.0)
    k.arrived("mid1", hints("mid"), arrival=3.0)  # waiting, short of blocks
    assert k.revoke(num_leases=1, requester="mid1") == []  # "old" arrived first: it keeps its pin
    assert [lease.owner for lease in k.revoke(num_leases=1, requester="mid1", idle=True)] == ["old"]


def test_the_kit_counts_who_took_each_revoked_lease():
    """A low hit share on the live bench could not say what took the pins
    back: an idle engine, a waiting turn, a request without a program, or
    the engine short of blocks for a running request."""
    from kvttl.kit import REVOCATION_CAUSES

    k, _, clock = kit()
    for i, program in enumerate("ABCDE"):
        k.arrived(f"{program}1", hints(program), arrival=float(i))
        assert finish(k, f"{program}1", blocks=(i,)).granted
    k.arrived("Y1", hints("Y"), arrival=0.5)

    def taken(**kw):
        return [lease.owner for lease in k.revoke(num_leases=1, **kw)]

    assert taken(idle=True) == ["E"]  # nothing runs: the latest program's lease
    assert taken(requester="Y1") == ["D"]  # a turn takes the lease of a program that arrived after its own
    assert taken(requester=None, arrival=clock.t, waited_s=0.0) == []  # a new request, not yet past the bound
    assert taken(requester="bg", arrival=1.5, waited_s=0.0) == ["C"]  # one that arrived before "C" did
    assert taken() == ["B"]  # vLLM's has_pending_block_frees: no requester named
    assert k.revoked_by == {"idle": 1, "turn": 1, "request": 1, "engine": 1}
    assert tuple(k.revoked_by) == REVOCATION_CAUSES
    assert sum(k.revoked_by.values()) == k.stats["revoked"] == 4
    k.check_invariants()


def test_the_policy_learns_how_each_lease_ended():
    """kvttl prices a pin by its chance of surviving: the kit tells the TTL
    policy how every lease ended, revoked, expired or released."""
    k, _, clock = kit("kvttl")
    for i, (key, program) in enumerate((("a1", "A"), ("b1", "B"), ("c1", "C"))):
        k.arrived(key, hints(program, ttl_s=10.0), arrival=float(i))
        assert finish(k, key).granted
    assert [lease.owner for lease in k.revoke(num_leases=1, idle=True)] == ["C"]  # latest program first
    k.arrived("a2", hints("A", ttl_s=10.0))
    k.admitted("a2", device_hit_tokens=48)  # its turn came back: released to it
    clock.t += 11
    assert k.tick() and k.num_leases == 0  # B expired
    revoked = k.policy.ttl.revoked
    assert len(revoked) == 3 and revoked.mean() == pytest.approx(1 / 3)


def test_a_failed_engine_hold_leaves_no_lease():
    k, _, _ = kit(engine=Engine(fail_pin=True))
    k.arrived("a1", hints("A"))
    with pytest.raises(RuntimeError, match="could not take"):
        finish(k, "a1")
    assert k.num_leases == 0 and k.num_pinned == 0


def test_refusal_reasons():
    k, _, _ = kit(pinned_share_cap=0.05)  # one block of 32
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").reason == "cap"
    k.arrived("b1", hints("B"))
    assert finish(k, "b1", blocks=()).reason == "no_blocks"
    k2, _, _ = kit("vllm")
    k2.arrived("a1", hints("A"))
    assert finish(k2, "a1").reason == "policy"
    k2.arrived("a2", hints("A"))
    assert finish(k2, "a2", aborted=True).reason == "aborted" and "A" not in k2.programs


def test_the_clients_report_says_why_a_lease_was_not_granted():
    """Issue #17: ``lease_granted: false`` names the reason, and what the cap refused."""
    k, _, _ = kit(pinned_share_cap=0.05)
    k.arrived("a1", hints("A", tool="bash"))
    assert finish(k, "a1").report() == {"lease_granted": False, "reason": "cap", "ttl_s": 10.0, "tool": "bash"}
    k2, _, _ = kit()
    k2.arrived("a1", hints("A"))
    granted = finish(k2, "a1").report(hints("A", warnings=("ttl ignored: 'soon'",)))
    assert granted["lease_granted"] and granted["ttl_s"] == 10.0 and granted["num_blocks"] == 3
    assert granted["hint_warnings"] == ["ttl ignored: 'soon'"] and "reason" not in granted
    k2.arrived("a2", hints("A", last_turn=True))
    assert finish(k2, "a2").report() == {"lease_granted": False, "reason": "last_turn"}
    errors = []
    assert read_hints({"program_id": ["x"]}, log=logging.getLogger("kvttl.test"), errors=errors) is None
    assert hint_report(errors) == {"lease_granted": False, "reason": "hint_invalid", "hint_errors": errors}
    assert len(errors) == 1 and "program_id" in errors[0]


def test_offload_modes_decide_what_is_copied_at_finish():
    for mode, granted_copy, refused_copy in [("on_finish", True, True), ("on_unpin", False, True),
                                             ("none", False, False)]:
        k, engine, _ = kit(host=True, offload=mode, pinned_share_cap=0.1)
        k.arrived("a1", hints("A"))
        assert finish(k, "a1").copied_out is granted_copy
        k.arrived("b1", hints("B"))
        assert finish(k, "b1", blocks=range(10, 20)).copied_out is refused_copy, mode  # refused by the cap
    k, engine, _ = kit(host=False, offload="on_finish")  # no host tier: never asked
    k.arrived("a1", hints("A"))
    assert not finish(k, "a1").copied_out and not any(c[0] == "copy_out" for c in engine.calls)


def test_queue_keys_follow_the_policy():
    k, _, _ = kit(max_queue_jump_prefills=None)
    k.arrived("a1", hints("A"), arrival=1.0)
    finish(k, "a1")
    assert k.queue_key("A", 50.0) == (False, 1.0, 50.0)  # pinned, as old as its program
    assert k.queue_key(None, 20.0) == (True, 20.0, 20.0)  # no program: a program of one turn


def test_an_old_program_overtakes_only_requests_of_its_last_few_prefills():
    """Issue #17: program-level FCFS put every agent turn ahead of all traffic
    without a program id that arrived after the agent began. A turn now
    overtakes requests of the last max_queue_jump_prefills re-prefills of its
    context (at the measured rate), or of the last max_queue_jump_s seconds."""
    k, _, _ = kit(reload_tokens_per_s=100.0, measure_costs=False)
    k.arrived("a1", hints("A"), arrival=1.0)
    k.finished("a1", blocks=[], num_tokens=40, free_blocks=20)  # no lease: only the arrival bound matters
    assert k.max_queue_jump(k.programs.get("A")) == pytest.approx(3 * 40 / 100.0)  # 3 prefills of 40 tokens
    turn = k.queue_key("A", 100.0)
    assert k.queue_key(None, 98.7) < turn < k.queue_key(None, 98.9)
    seconds, _, _ = kit(max_queue_jump_s=5.0)
    seconds.arrived("a1", hints("A"), arrival=1.0)
    finish(seconds, "a1", blocks=())
    assert seconds.queue_key(None, 94.0) < seconds.queue_key("A", 100.0) < seconds.queue_key(None, 95.5)
    unbounded, _, _ = kit(max_queue_jump_prefills=None)
    unbounded.arrived("a1", hints("A"), arrival=1.0)
    finish(unbounded, "a1", blocks=())
    assert unbounded.queue_key("A", 100.0) < unbounded.queue_key(None, 2.0)
    for key in ("max_queue_jump_s", "max_queue_jump_prefills"):
        with pytest.raises(BadArgumentError, match=key):
            load_config({key: -1})


def test_the_policys_aging_and_the_operators_bound_the_tighter_wins():
    """kvttl's own aging (SchedulingPolicy.max_queue_jump_prefills, issue #13:
    short programs were starved behind long ones) applies with no operator
    bound, and an operator's tighter bound still wins."""
    from kvttl.policy.registry import KVTTL_QUEUE_JUMP_PREFILLS

    def bound(**config):
        k, _, _ = kit("kvttl", reload_tokens_per_s=100.0, measure_costs=False, **config)
        k.arrived("a1", hints("A"), arrival=1.0)
        k.finished("a1", blocks=[], num_tokens=40, free_blocks=20)
        return k.max_queue_jump(k.programs.get("A"))

    assert bound(max_queue_jump_prefills=None) == pytest.approx(KVTTL_QUEUE_JUMP_PREFILLS * 40 / 100.0)
    assert bound() == pytest.approx(3 * 40 / 100.0)  # the operator's default, 3 prefills, is tighter
    assert bound(max_queue_jump_prefills=None, max_queue_jump_s=1000.0) == pytest.approx(
        KVTTL_QUEUE_JUMP_PREFILLS * 40 / 100.0)
    unbounded, _, _ = kit("continuum", max_queue_jump_prefills=None)
    unbounded.arrived("a1", hints("A"), arrival=1.0)
    finish(unbounded, "a1", blocks=())
    assert unbounded.max_queue_jump(unbounded.programs.get("A")) is None  # Continuum's order: unbounded


def test_ordinal_arrivals_make_queue_keys_depend_on_the_stamps_order_alone():
    """SGLang under tensor parallelism: each rank stamps arrivals with its own
    clock. kvttl's own aging bound and its Gittins-scaled order both turn
    stamp differences into keys, so two ranks could sort one queue apart;
    with ordinal_arrivals every bound is off and the order is program FCFS."""
    def order(ordinal, gap, finished_programs=0, **config):
        config = {"max_queue_jump_prefills": None} | config  # the operator's bound off, as SGLang had it
        k = EngineKit(Engine(), num_blocks=32, block_size=16, clock=Clock(), ordinal_arrivals=ordinal,
                      config=KitConfig(policy="kvttl", reload_tokens_per_s=100.0, measure_costs=False, **config))
        for i in range(finished_programs):  # every program 2 turns: after one, G(1) = 1 and G(0) = 0.5
            for turn in (0, 1):
                k.arrived(f"p{i}.{turn}", hints(f"P{i}", last_turn=turn == 1), arrival=0.0)
                k.finished(f"p{i}.{turn}", blocks=[], num_tokens=40, free_blocks=20)
        k.arrived("a1", hints("A"), arrival=1.0)
        k.finished("a1", blocks=[], num_tokens=40, free_blocks=20)
        queue = {"plain": k.queue_key(None, 50.0), "A": k.queue_key("A", 50.0 + gap)}
        return sorted(queue, key=queue.get), k.max_queue_jump(k.programs.get("A"))

    # stamped 20 s apart on one rank and 2 s on another: the policy's own bound (30 prefills, 12 s) splits
    # them, and so does the Gittins share (0.5 here) of the time since the bounded arrival
    assert order(False, 20.0)[0] != order(False, 2.0)[0]
    assert order(False, 20.0, finished_programs=12)[0] != order(False, 2.0, finished_programs=12)[0]
    for gap in (20.0, 2.0):
        assert order(True, gap) == (["A", "plain"], None)
        assert order(True, gap, finished_programs=12)[0] == ["A", "plain"]
        assert order(True, gap, max_queue_jump_s=1.0) == (["A", "plain"], None)  # the operator's seconds too


def test_a_tool_the_lease_table_would_refuse_is_no_tool():
    """An engine reads the tool from the model's output; a name with a lone
    surrogate made the lease table's grant raise inside the engine's
    request-finished hook."""
    k, _, _ = kit()
    k.arrived("a1", hints("A"))
    outcome = finish(k, "a1", tool="x\ud800")
    assert outcome.granted and outcome.tool == ""


def test_a_reused_request_key_ends_the_old_turn():
    k, _, _ = kit()
    k.arrived("x", hints("A"))
    k.arrived("x", hints("B"))
    assert k.num_turns_in_flight == 1 and "A" not in k.programs
    k.check_invariants()


def test_the_table_forgets_idle_programs_by_one_rule():
    table = ProgramTable(max_programs=3, forget_after_s=10.0)
    busy = table.add("busy", 0.0, now=0.0)
    busy.in_flight = 1
    for i in range(4):
        table.add(f"idle{i}", 0.0, now=float(i))
    # Over the bound: the least recently active idle ones go; the busy one stays.
    assert [p.program_id for p in table] == ["busy", "idle2", "idle3"]
    assert table.forget_idle(now=12.5) == 1  # idle2 quiet for 10.5 s, idle3 for 9.5 s
    assert [p.program_id for p in table] == ["busy", "idle3"]


def test_config_is_checked_at_start_and_names_the_key(caplog):
    with pytest.raises(BadArgumentError, match="unknown key 'ttl'"):
        load_config({"ttl": "5m"})
    with pytest.raises(BadArgumentError, match="pinned_share_cap"):
        load_config({"pinned_share_cap": 3})
    with pytest.raises(BadArgumentError, match="unknown policy 'nope'"):
        load_config({"policy": "nope"})
    with pytest.raises(BadArgumentError, match="reload_tokens_per_s"):
        load_config({"reload_tokens_per_s": "fast"})
    with pytest.raises(BadArgumentError, match="not both"):
        load_config({"policy": "vllm", "ttl_policy": "vllm"})
    with caplog.at_level(logging.WARNING):
        config, extras = load_config({"ttl_policy": "fixed:2s", "host_tier_blocks": 8},
                                     extra_keys=("host_tier_blocks",))
    assert config.policy == "fixed:2s" and extras == {"host_tier_blocks": 8}
    assert "'ttl_policy' is now 'policy'" in caplog.text


def test_hints_never_raise(caplog):
    log = logging.getLogger("kvttl.test")
    assert read_hints(payload_from_envelope(make_kv_hints("A", ttl="5s")), log=log).ttl_s == 5.0
    with caplog.at_level(logging.WARNING):
        for payload in ({"program_id": "\ud800"}, {"program_id": "p", "ttl": 10**400}, "junk",
                        {"program_id": "p", "tool": "\ud800"}, {"program_id": "x" * 1000}):
            read_hints(payload, log=log)
    assert len(caplog.records) == 5


def test_a_ttl_policy_must_be_one():
    class NotAPolicy:
        name = "x"

        def ttl(self, turn):
            return 1.0

    with pytest.raises(BadArgumentError, match="lacks offload"):
        SchedulingPolicy(name="x", description="", ttl=NotAPolicy(), queue_order=program_fcfs)
    SchedulingPolicy(name="x", description="", ttl=FixedTTL(1.0), queue_order=program_fcfs)


def test_next_deadline_is_the_earliest_lease():
    k, _, clock = kit()  # every lease 10 s
    assert k.next_deadline() is None
    for key, program in (("a1", "A"), ("b1", "B")):
        k.arrived(key, hints(program))
        finish(k, key)
        clock.t += 3.0
    assert k.next_deadline() == 110.0
    clock.t = 110.0
    k.tick()
    assert k.next_deadline() == 113.0 and k.num_leases == 1


def test_the_waker_wakes_the_engine_once_per_deadline_given():
    """Issue #17: an idle engine is woken at a lease's deadline, not at its next request."""
    import threading
    import time

    woke = threading.Event()
    times = []

    def wake():
        times.append(time.monotonic())
        woke.set()

    waker = DeadlineWaker(wake)
    try:
        start = time.monotonic()
        waker.wake_at(start + 0.2)
        assert woke.wait(5)
        assert times[0] >= start + 0.2
        woke.clear()
        waker.wake_at(time.monotonic() + 0.1)
        waker.wake_at(None)  # the lease went some other way: no wake-up
        assert not woke.wait(0.4)
        waker.wake_at(time.monotonic() + 60)
        waker.wake_at(time.monotonic() + 0.05)  # an earlier deadline replaces a later one
        assert woke.wait(5) and len(times) == 2 and waker.num_wakes == 2
    finally:
        waker.close()
    assert not waker._thread.is_alive()


def test_a_failing_wake_is_logged_and_the_waker_goes_on(caplog):
    import time

    calls = []

    def wake():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("queue closed")

    waker = DeadlineWaker(wake)
    try:
        with caplog.at_level(logging.WARNING, logger="kvttl.kit"):
            waker.wake_at(time.monotonic())
            deadline = time.monotonic() + 5
            while not calls and time.monotonic() < deadline:
                time.sleep(0.01)
            waker.wake_at(time.monotonic())
            while len(calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(calls) == 2 and "queue closed" in caplog.text
    finally:
        waker.close()


def test_leases_that_never_expire_set_no_wake_up():
    """A lease renewed to infinity (held while its program waits) is not a deadline: the waker's
    wait must not overflow (review finding)."""
    k, _, clock = kit()
    k.arrived("a1", hints("A"))
    finish(k, "a1")
    k.table.renew("A", math.inf)
    assert k.next_deadline() is None
    woke = []
    waker = DeadlineWaker(lambda: woke.append(1))
    try:
        waker.wake_at(math.inf)
        waker.wake_at(1e300)  # far, but finite: the wait is clamped
        assert waker._thread.is_alive() and not woke
    finally:
        waker.close()


def test_bad_tool_prior_counts_and_both_jump_bounds_are_refused():
    with pytest.raises(BadArgumentError, match="tool_priors_s has 4097 tools"):
        load_config({"tool_priors_s": {f"t{i}": 1.0 for i in range(4097)}})
    with pytest.raises(BadArgumentError, match="not both"):
        load_config({"max_queue_jump_s": 1.0, "max_queue_jump_prefills": 2.0})
    assert load_config({"max_queue_jump_s": 1.0, "max_queue_jump_prefills": None})[0].max_queue_jump_s == 1.0


def test_the_kvttl_order_learns_program_lengths_from_last_turns_only():
    """GittinsOrder hears of a program when its last turn finishes, with the
    turns it ran; an aborted last turn teaches nothing."""
    k, engine, clock = kit("kvttl")
    lengths = k.policy.queue_order.lengths
    for program, turns in (("A", 3), ("B", 1)):
        for t in range(turns):
            key = f"{program}{t}"
            k.arrived(key, hints(program, last_turn=t == turns - 1))
            k.admitted(key, device_hit_tokens=0)
            finish(k, key)
    assert sorted(lengths._order) == [1, 3]
    k.arrived("C0", hints("C", last_turn=True))
    k.admitted("C0", device_hit_tokens=0)
    finish(k, "C0", aborted=True)
    assert len(lengths) == 2
    k.check_invariants()


class _Delays:
    """The on_admitted reports a policy receives."""

    def __init__(self, ttl):
        self.ttl, self.seen = ttl, []
        ttl.on_admitted = lambda delay, evicted: self.seen.append((round(delay, 6), evicted))


def test_with_first_tokens_a_lost_context_reports_its_delay_beyond_its_own_prefill():
    """An engine that reports first tokens: a returning turn's delay runs to
    its first token, less the prefill it needed at the learned rate, so a
    re-prefill slowed by other work counts; a hit reports too, not evicted."""
    k, engine, clock = kit("continuum", measure_costs=False, reload_tokens_per_s=1000.0)
    delays = _Delays(k.policy.ttl)
    k.times_first_tokens = True
    k.arrived("a0", hints("A"), prompt_tokens=100)
    k.admitted("a0", device_hit_tokens=0)
    k.first_token("a0")  # a first turn: nothing to report
    finish(k, "a0", blocks=(1, 2, 3, 4, 5, 6))  # 101 tokens of context
    clock.t += 2
    k.arrived("a1", hints("A"), prompt_tokens=150)
    clock.t += 0.5
    k.admitted("a1", device_hit_tokens=0)  # everything lost: 150 tokens to prefill, 0.15 s
    assert delays.seen == [] and k.awaiting_first_token == {"a1"}
    k.check_invariants()
    clock.t += 0.75
    k.first_token("a1")
    assert delays.seen == [(1.1, True)] and not k.awaiting_first_token  # 1.25 s - 0.15 s
    k.first_token("a1")  # reported once
    assert len(delays.seen) == 1
    finish(k, "a1", blocks=(1, 2, 3, 4, 5, 6, 7, 8, 9))
    # a turn that finishes before anyone saw its first token reports at its finish
    k.arrived("a2", hints("A"), prompt_tokens=160)
    k.admitted("a2", device_hit_tokens=144)
    clock.t += 0.1
    finish(k, "a2")
    assert delays.seen[-1] == (0.084, False)  # 0.1 s - 16 tokens' 0.016 s
    k.check_invariants()


def test_an_aborted_or_reset_turn_awaiting_its_first_token_reports_nothing():
    k, engine, clock = kit("continuum", measure_costs=False)
    delays = _Delays(k.policy.ttl)
    k.times_first_tokens = True
    for key in ("a0", "a1"):
        k.arrived(key, hints("A"))
        k.admitted(key, device_hit_tokens=0)
        finish(k, key)
    assert k.awaiting_first_token == set() and len(delays.seen) == 1  # a1 reported at its finish
    k.arrived("a2", hints("A"))
    k.admitted("a2", device_hit_tokens=0)
    finish(k, "a2", aborted=True)
    k.arrived("b0", hints("B"))
    finish(k, "b0")
    k.arrived("b1", hints("B"))
    k.admitted("b1", device_hit_tokens=0)
    assert k.awaiting_first_token == {"b1"}
    k.reset()
    assert not k.awaiting_first_token and len(delays.seen) == 1
    k.check_invariants()


def test_without_first_tokens_a_returning_turn_reports_at_admission():
    k, engine, clock = kit("continuum", measure_costs=False)
    delays = _Delays(k.policy.ttl)
    k.arrived("a0", hints("A"))
    finish(k, "a0")
    k.arrived("a1", hints("A"))
    clock.t += 0.25
    k.admitted("a1", device_hit_tokens=0)
    assert delays.seen == [(0.25, True)] and not k.awaiting_first_token


def test_a_request_without_a_program_waits_for_pinned_memory_no_longer_than_the_aging_bound():
    """Issue #17 (traffic without a program id is pushed aside): under program
    FCFS a one-turn request arrived after every pinned program, so it could
    never revoke a pin and waited for the leases to expire. It may take a
    lease once it has waited longer than the lease's program could jump the
    queue (here the operator's 2 s); with unbounded aging (Continuum's order)
    the pin stays, and a program's turns keep program order."""
    k, engine, _ = kit(max_queue_jump_s=2.0, max_queue_jump_prefills=None)
    k.arrived("a1", hints("A"), arrival=1.0)
    finish(k, "a1")
    assert k.revoke(num_leases=1, arrival=5.0, waited_s=1.5) == []  # within the bound: A keeps its pin
    assert k.revoke(num_leases=1, arrival=5.0) == []  # how long it waited unknown: program order alone
    assert [lease.owner for lease in k.revoke(num_leases=1, arrival=5.0, waited_s=2.5)] == ["A"]
    assert engine.calls[-1] == ("unpin", "a1", "revoked", False)
    unbounded, _, _ = kit(max_queue_jump_s=None, max_queue_jump_prefills=None)
    unbounded.arrived("a1", hints("A"), arrival=1.0)
    finish(unbounded, "a1")
    assert unbounded.revoke(num_leases=1, arrival=5.0, waited_s=1e6) == []
    k.arrived("b1", hints("B"), arrival=6.0)  # a waiting turn of a later program: program order, as before
    k.arrived("c1", hints("C"), arrival=0.5)
    finish(k, "c1")
    assert k.revoke(num_leases=1, requester="b1", waited_s=100.0) == []
    k.check_invariants()
