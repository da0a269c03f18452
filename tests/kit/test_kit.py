"""The engine kit on its own: a fake engine that records what the kit asks
of it. (Every integration runs the shared scenarios in tests/conformance.)"""

from __future__ import annotations

import logging
import math

import pytest

from kvttl.errors import BadArgumentError
from kvttl.kit import EngineKit, KitConfig, ProgramTable, load_config, make_kv_hints, payload_from_envelope, read_hints
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


def test_later_programs_may_not_revoke_earlier_ones_unless_nothing_runs():
    k, engine, _ = kit()
    k.arrived("old1", hints("old"), arrival=1.0)
    finish(k, "old1")
    k.arrived("new1", hints("new"), arrival=5.0)
    k.arrived("mid1", hints("mid"), arrival=3.0)  # waiting, short of blocks
    assert k.revoke(num_leases=1, requester="mid1") == []  # "old" arrived first: it keeps its pin
    assert [lease.owner for lease in k.revoke(num_leases=1, requester="mid1", idle=True)] == ["old"]


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
    k, _, _ = kit()
    k.arrived("a1", hints("A"), arrival=1.0)
    finish(k, "a1")
    assert k.queue_key("A", 50.0) == (False, 1.0, 50.0)  # pinned, as old as its program
    assert k.queue_key(None, 20.0) == (True, 20.0, 20.0)  # no program: a program of one turn


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
