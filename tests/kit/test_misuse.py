"""The engine kit called wrongly by its engine, or by a hook that fails.

Each case is a finding of an outside review (an engine author adopting the
kit from the README, 2026-12-06): the call must raise a KvttlError
(BadArgumentError, or the lease table's UnknownBlockError for a block id)
naming what was wrong and change nothing, or, where a hook raised, finish
its bookkeeping so that no lease is lost or held twice."""

from __future__ import annotations

import math

import pytest

from kvttl.errors import BadArgumentError, KvttlError
from kvttl.policy import TurnHints, parse_turn_hints

from .test_kit import Engine, finish, hints, kit


def test_a_new_program_past_max_programs_is_kept_while_the_older_ones_are_busy():
    # was: KeyError from ProgramTable.add forgetting the program it had just added (idle: no turn yet)
    k, engine, clock = kit(max_programs=1)
    k.arrived("a1", hints("A"))
    k.admitted("a1", device_hit_tokens=0)
    assert finish(k, "a1").granted
    k.arrived("b1", hints("B"))
    assert "B" in k.programs
    k.admitted("b1", device_hit_tokens=0)
    assert finish(k, "b1", blocks=(4, 5)).granted
    k.check_invariants()


def test_the_sweep_at_a_finish_never_forgets_the_program_it_is_granting():
    # past max_programs, the sweep ran after the turn left flight: the program looked idle, was
    # forgotten, and then granted a lease that no program record held (leaked)
    k, engine, clock = kit(max_programs=1)
    k.arrived("a1", hints("A"))
    k.arrived("b1", hints("B"))
    assert finish(k, "a1").granted
    clock.t += 3600  # the next finish sweeps
    assert finish(k, "b1", blocks=(4, 5)).granted
    assert k.has_lease("B")
    k.check_invariants()
    assert k.release_all() == 2 and not engine.held


class FailingUnpin(Engine):
    def __init__(self, failures=1):
        super().__init__()
        self.failures = failures

    def unpin(self, handle, *, reason, copy_out):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("transient engine error")
        super().unpin(handle, reason=reason, copy_out=copy_out)


def test_an_unpin_that_raises_loses_no_other_lease():
    # was: the first expiry's exception left the second lease gone from the table but held by the
    # kit, num_leases 1 with leases() empty, and it never expired
    engine = FailingUnpin()
    k, engine, clock = kit(engine=engine)
    for key, program, blocks in (("a1", "A", (1, 2)), ("b1", "B", (3, 4))):
        k.arrived(key, hints(program))
        assert finish(k, key, blocks=blocks).granted
    clock.t += 60
    with pytest.raises(RuntimeError, match="transient"):
        k.tick()
    k.check_invariants()
    assert k.num_leases == 0 and k.stats["expired"] == 2 and k.tick() == []
    assert len(engine.held) == 1  # the hold whose unpin failed is the engine's to retry; the kit let it go


def test_a_released_lease_whose_unpin_raises_is_still_counted():
    engine = FailingUnpin()
    k, engine, clock = kit(engine=engine)
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").granted
    with pytest.raises(RuntimeError):
        k.release("A")
    k.check_invariants()
    assert k.num_leases == 0 and k.stats["released"] == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "x", None])
def test_a_stamp_that_is_not_a_finite_number_is_refused(bad):
    # was: arrival=nan was accepted, and every later grant of that program raised "priority must be finite"
    k, engine, clock = kit()
    if bad is not None:
        with pytest.raises(BadArgumentError, match="arrival"):
            k.arrived("a1", hints("A"), arrival=bad)
    with pytest.raises(BadArgumentError, match="now"):
        k.arrived("a1", hints("A"), now=bad if bad is not None else "never")
    assert "A" not in k.programs and k.num_turns_in_flight == 0
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").granted


@pytest.mark.parametrize("call, message", [
    (dict(blocks=None), "blocks"),
    (dict(blocks=[0, 999]), "finished: blocks: .*999"),
    (dict(blocks=[-1]), "finished: blocks: .*-1"),
    (dict(blocks=[1.5]), "finished: blocks: .*float"),
    (dict(blocks=[1, 1]), "finished: blocks: .*more than once"),
    (dict(blocks=[1, 2, 3, 4, 5, 6], num_tokens=1), "num_tokens"),
    (dict(num_tokens=-1), "num_tokens"),
    (dict(num_tokens=math.nan), "num_tokens"),
    (dict(free_blocks=-10), "free_blocks"),
    (dict(free_blocks=10**9), "free_blocks"),
    (dict(now=math.nan), "now"),
])
def test_a_finish_with_a_bad_argument_raises_and_keeps_the_turn(call, message):
    # was: a TypeError, or an UnknownBlockError after the turn had left flight, so the retry got None
    k, engine, clock = kit()
    k.arrived("a1", hints("A"))
    k.admitted("a1", device_hit_tokens=0)
    args = dict(blocks=[1, 2, 3], num_tokens=53, free_blocks=20, pin_ref="a1") | call
    with pytest.raises(KvttlError, match=message):  # BadArgumentError, or UnknownBlockError for an id
        k.finished("a1", **args)
    assert k.num_turns_in_flight == 1 and k.programs.get("A").num_turns == 0 and k.num_leases == 0
    assert finish(k, "a1").granted
    k.check_invariants()


@pytest.mark.parametrize("bad", [-1, math.nan, "many", 1.5])
def test_arrived_refuses_a_bad_prompt_size(bad):
    k, engine, clock = kit()
    with pytest.raises(BadArgumentError, match="prompt_tokens"):
        k.arrived("a1", hints("A"), prompt_tokens=bad)
    assert k.num_turns_in_flight == 0 and "A" not in k.programs


def test_arrived_refuses_hints_that_are_not_turn_hints():
    # was: AttributeError: 'dict' object has no attribute 'key'
    k, engine, clock = kit()
    with pytest.raises(BadArgumentError, match="TurnHints"):
        k.arrived("a1", {"program_id": "A"})
    assert k.num_turns_in_flight == 0


@pytest.mark.parametrize("method", ["release", "has_lease", "lease_of"])
def test_program_ids_of_the_wrong_type_are_refused(method):
    # was: TypeError: unhashable type: 'list'
    k, engine, clock = kit()
    with pytest.raises(BadArgumentError, match="program_id"):
        getattr(k, method)(["x"])


@pytest.mark.parametrize("field, value", [
    ("program_id", None), ("program_id", ""), ("program_id", " "), ("program_id", "a\nb"), ("program_id", True),
    ("program_id", 2**64), ("ttl_s", math.nan), ("ttl_s", -5.0), ("ttl_s", "abc"), ("ttl_s", math.inf),
    ("last_turn", "garbage"), ("tool", 3), ("tool", "a\x00b"),
])
def test_turn_hints_made_by_an_engine_are_validated(field, value):
    # was: TurnHints said "validated" and took all of these; a NaN ttl reached the client's report
    args = {"program_id": "A", field: value}
    with pytest.raises(BadArgumentError, match=field):
        TurnHints(**args)


def test_turn_hints_keep_what_a_client_may_send():
    assert TurnHints("A", ttl_s=0.0).ttl_s == 0.0
    assert TurnHints(7, tool="bash:pytest", last_turn=True, ttl_s=30).ttl_s == 30
    assert TurnHints(-(2**63)).program_id == -(2**63)


@pytest.mark.parametrize("value, last, warned", [
    (True, True, False), (False, False, False), ("yes", True, False), ("false", False, False), (0, False, False),
    (1, True, False), ("garbage", False, True), ("1.0", False, True), ([0], False, True), ({"x": 0}, False, True),
    (math.nan, False, True), (2, False, True),
])
def test_a_last_turn_hint_that_is_not_a_yes_or_no_is_a_warning(value, last, warned):
    # was: coerced silently ("garbage" False, [0] and NaN True; a numpy array dropped every hint)
    parsed = parse_turn_hints({"program_id": "A", "last_turn": value, "ttl": "5s"})
    assert parsed.last_turn is last and parsed.ttl_s == 5.0
    assert any("last_turn" in w for w in parsed.warnings) is warned


def test_a_numpy_last_turn_warns_and_keeps_the_other_hints():
    np = pytest.importorskip("numpy")
    parsed = parse_turn_hints({"program_id": "A", "last_turn": np.array([1, 2]), "tool": "bash"})
    assert parsed.tool == "bash" and parsed.last_turn is False and "last_turn" in parsed.warnings[0]


def test_the_client_hears_of_a_clamped_ttl_only_when_the_clamp_set_the_ttl():
    # was: under fixed:5s a client ttl of 700 s was reported as "clamped to max_ttl_s" though the
    # policy pinned for 5 s and never read it
    k, engine, clock = kit("fixed:5s", max_ttl_s=600.0)
    k.arrived("a1", hints("A", ttl_s=700.0))
    report = finish(k, "a1").report(hints("A", ttl_s=700.0))
    assert report["ttl_s"] == 5.0 and "ttl_clamped_from_s" not in report and "hint_warnings" not in report
    k, engine, clock = kit("continuum", max_ttl_s=600.0)  # honours the hint: the clamp is what it got
    k.arrived("a1", hints("A", ttl_s=700.0))
    report = finish(k, "a1").report(hints("A", ttl_s=700.0))
    assert report["ttl_s"] == 600.0 and report["ttl_clamped_from_s"] == 700.0


@pytest.mark.parametrize("given, message", [
    ({"max_ttl_s": 10**400}, "max_ttl_s must be a number"),  # was: OverflowError naming no key
    ({"policy": "fixed:-5s"}, "policy 'fixed:-5s': ttl hint '-5s'"),  # was: named only the ttl hint
    ({"honor_hints": False}, "unknown key 'honor_hints'"),
])
def test_config_errors_name_the_key(given, message):
    from kvttl.kit import load_config

    with pytest.raises(BadArgumentError, match=message):
        load_config(given)


def test_a_hint_with_a_typo_is_a_warning_not_silence():
    # was: {"programId": ...} took the normal path and {"ttl_s": 5} was dropped, both without a word
    parsed = parse_turn_hints({"program_id": "A", "ttl_s": 5, "tool": "bash"})
    assert parsed.tool == "bash" and parsed.ttl_s is None
    assert parsed.warnings == ("unknown hint 'ttl_s' ignored; known: program_id, tool, last_turn, ttl",)
    with pytest.raises(BadArgumentError, match="without a program_id.*'programId'"):
        parse_turn_hints({"programId": "A", "ttl": "5s"})


def test_hints_without_a_program_id_are_reported_to_the_client():
    import logging

    from kvttl.kit import hint_report, read_hints

    errors = []
    assert read_hints({"tool": "bash"}, log=logging.getLogger("kvttl.test"), errors=errors) is None
    assert hint_report(errors)["reason"] == "hint_invalid" and "program_id" in errors[0]


def test_a_requests_turn_hints_name_its_program_everywhere():
    # has_lease and release took a raw id plus tenant=, queue_key the scoped TurnHints.key
    k, engine, clock = kit()
    scoped = TurnHints("agent", tenant="T1")
    k.arrived("a1", scoped)
    assert finish(k, "a1").granted
    assert k.has_lease(scoped) and k.has_lease("agent", tenant="T1") and not k.has_lease("agent")
    assert k.lease_of(scoped) is not None
    with pytest.raises(BadArgumentError, match="not both"):
        k.has_lease(scoped, tenant="T1")
    assert k.release(scoped) and not k.has_lease(scoped)
