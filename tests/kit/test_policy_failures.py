"""A scheduling policy's own code failing inside the engine kit, and policies
built or registered wrongly.

Each case is a finding of an outside review (an engine author writing their
own policy from the README, 2026-12-06). The policy runs on the engine's
scheduling path. So when its code raises or returns something unusable, the
kit skips it at that call, keeps its books and the engine's holds right, and
counts the failure (``policy_errors``). It does not crash the engine or leak
a block. ``kvttl simulate`` stops with a PolicyError naming the policy.
Policies that are wrong before they run are refused where they are built or
registered, with a BadArgumentError that names what was wrong."""

from __future__ import annotations

import json
import math

import pytest

from kvttl.errors import BadArgumentError, PolicyError
from kvttl.kit import EngineKit, KitConfig, load_config
from kvttl.policy import (NeverPin, QueueEntry, SchedulingPolicy, TTLPolicy, get_policy, program_fcfs,
                          register_policy, request_fcfs)
from kvttl.policy import registry

from .test_kit import Clock, Engine, finish, hints


class Pin(TTLPolicy):
    """Pins for ``ttl_s``; the methods named in ``broken`` raise."""

    name = "pin"

    def __init__(self, ttl_s=10.0, broken=()):
        self.ttl_s, self.broken = ttl_s, set(broken)

    def _maybe_raise(self, method):
        if method in self.broken:
            raise RuntimeError(f"bug in {method}")

    def ttl(self, turn):
        self._maybe_raise("ttl")
        return self.ttl_s

    def offload(self, turn):
        self._maybe_raise("offload")
        return False

    def on_tool_return(self, tool, duration_s):
        self._maybe_raise("on_tool_return")

    def on_admitted(self, queue_delay_s, evicted):
        self._maybe_raise("on_admitted")

    def on_program_finished(self, num_turns):
        self._maybe_raise("on_program_finished")

    def on_lease_ended(self, reason):
        self._maybe_raise("on_lease_ended")


def bundle(ttl=None, **kw):
    fields = dict(name="mine", description="a user's policy", ttl=ttl or Pin(), queue_order=program_fcfs)
    return SchedulingPolicy(**{**fields, **kw})


def kit_with(policy, *, host=False, **config):
    clock = Clock()
    engine = Engine()
    k = EngineKit(engine, num_blocks=32, block_size=16, config=KitConfig(**config), clock=clock, policy=policy,
                  has_host_tier=host)
    return k, engine, clock


# ---- the kit survives a policy that fails ------------------------------------------------------
def test_a_policy_whose_on_lease_ended_raises_still_drops_the_engines_holds():
    # was: the policy hook ran before hooks.unpin, so every expiry left the engine's block
    # references held forever, with check_invariants passing
    k, engine, clock = kit_with(bundle(Pin(broken={"on_lease_ended"})))
    for key, program, blocks in (("a1", "A", (1, 2)), ("b1", "B", (3, 4)), ("c1", "C", (5, 6))):
        k.arrived(key, hints(program))
        assert finish(k, key, blocks=blocks).granted
    clock.t += 60
    assert len(k.tick()) == 3
    assert not engine.held and k.num_leases == 0
    assert k.policy_errors == 3 and "on_lease_ended()" in k.first_policy_error
    k.check_invariants()


def test_a_policy_whose_on_admitted_raises_still_hands_the_lease_over():
    # was: the hand-over was skipped, and the old lease stayed pinned with no deadline
    k, engine, clock = kit_with(bundle(Pin(broken={"on_admitted"})))
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").granted
    clock.t += 2
    k.arrived("a2", hints("A"))
    k.admitted("a2", device_hit_tokens=48)
    assert not k.has_lease("A") and not engine.held
    assert k.policy_errors == 1
    k.check_invariants()


@pytest.mark.parametrize("broken", ["on_tool_return", "on_program_finished", "offload"])
def test_a_policy_hook_that_raises_is_skipped_and_the_turn_goes_on(broken):
    k, engine, clock = kit_with(bundle(Pin(broken={broken})), host=True)
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").granted
    clock.t += 2
    k.arrived("a2", hints("A", last_turn=True))
    k.admitted("a2", device_hit_tokens=48)
    assert finish(k, "a2").reason == "last_turn"
    assert k.policy_errors == 1 and broken in k.first_policy_error
    assert not k.programs and not engine.held
    k.check_invariants()


class Returns(TTLPolicy):
    name = "returns"

    def __init__(self, value):
        self.value = value

    def ttl(self, turn):
        return self.value


@pytest.mark.parametrize("value", [None, "5", True, math.nan, -3.0, [5], 10**400])
def test_a_ttl_that_is_not_seconds_pins_nothing_and_the_turn_leaves_flight(value):
    # was: None/"5" raised TypeError with the turn still in flight forever (and killed vLLM's
    # engine core); True blamed the engine's blocks argument; NaN and -3 reached the client's
    # report (NaN is not JSON)
    k, engine, clock = kit_with(bundle(Returns(value)))
    k.arrived("a1", hints("A"))
    outcome = finish(k, "a1")
    assert not outcome.granted and outcome.reason == "policy_error"
    assert not k.turn("a1") and not engine.held
    assert k.policy_errors == 1 and "ttl()" in k.first_policy_error
    json.dumps(outcome.report(), allow_nan=False)
    k.check_invariants()


def test_a_ttl_that_raises_pins_nothing_and_the_turn_leaves_flight():
    k, engine, clock = kit_with(bundle(Pin(broken={"ttl"})))
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").reason == "policy_error"
    assert not k.turn("a1") and k.first_policy_error == "ttl(): raised RuntimeError: bug in ttl"


def test_an_infinite_ttl_is_a_pin_until_max_ttl_s():
    k, engine, clock = kit_with(bundle(Returns(math.inf)), max_ttl_s=30.0)
    k.arrived("a1", hints("A"))
    outcome = finish(k, "a1")
    assert outcome.granted and outcome.ttl_s == 30.0 and k.policy_errors == 0


def test_the_first_policy_failure_is_logged_once(caplog):
    k, engine, clock = kit_with(bundle(Pin(broken={"ttl"})))
    for i in range(3):
        k.arrived(f"a{i}", hints(f"P{i}"))
        finish(k, f"a{i}")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "'mine'" in errors[0].getMessage() and k.policy_errors == 3


@pytest.mark.parametrize("order", [
    lambda e: None,
    lambda e: (None, e.request_arrival),
    lambda e: {"a": 1},
    lambda e: (math.nan,),
    lambda e: 1 / 0,
])
def test_a_queue_order_that_fails_sorts_as_request_fcfs(order):
    # was: a bare TypeError from the engine's sort, naming no policy (NaN sorted silently)
    k, engine, clock = kit_with(bundle(queue_order=order))
    k.arrived("a1", hints("A"))
    keys = [k.queue_key("A", 5.0), k.queue_key(None, 3.0), program_fcfs(QueueEntry(4.0, 4.0, True, 0.0))]
    assert sorted(keys) == [(False, 4.0, 4.0), (3.0,), (5.0,)]  # a healthy order's key sorts beside them
    assert k.policy_errors == 2 and "queue_order" in k.first_policy_error


def test_a_revocation_order_that_fails_revokes_in_the_default_order():
    def broken(lease, now):
        raise RuntimeError("bug in the revocation order")

    k, engine, clock = kit_with(bundle(revocation=broken))
    for key, program, blocks in (("a1", "A", (1, 2)), ("b1", "B", (3, 4))):
        k.arrived(key, hints(program))
        assert finish(k, key, blocks=blocks).granted
    revoked = k.revoke(num_leases=1, idle=True)
    assert len(revoked) == 1 and revoked[0].owner == "B"  # the latest granted first
    assert k.policy_errors == 1 and "revocation order" in k.first_policy_error
    assert engine.held == {"a1"}
    k.check_invariants()


def test_a_revocation_order_whose_keys_do_not_sort_revokes_in_the_default_order():
    k, engine, clock = kit_with(bundle(revocation=lambda lease, now: None if lease.owner == "A" else 1.0))
    for key, program, blocks in (("a1", "A", (1, 2)), ("b1", "B", (3, 4))):
        k.arrived(key, hints(program))
        finish(k, key, blocks=blocks)
    assert len(k.revoke(num_leases=2, idle=True)) == 2 and not engine.held and k.policy_errors == 1


# ---- the simulator stops, naming the policy ------------------------------------------------------
def test_the_simulator_stops_with_a_policy_error_naming_the_policy():
    # was: a traceback through the process pool that never named the policy
    from kvttl.sim.runner import SweepConfig, run_sweep

    register_policy("test-broken-ttl", lambda **_: bundle(Pin(broken={"ttl"}), name="test-broken-ttl"),
                    replace=True)
    with pytest.raises(PolicyError, match=r"policy 'test-broken-ttl' failed .*ttl\(\): raised RuntimeError"):
        run_sweep(SweepConfig(policies=("test-broken-ttl",), jps=(0.2,), num_programs=4, workers=1),
                  progress=False)


# ---- policies built wrongly ---------------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    (dict(revocation="earliest_deadline"), "revocation: expected a function"),
    (dict(queue_order=None), "queue_order: expected a function"),
    (dict(queue_order="program-fcfs"), "queue_order: expected a function"),
    (dict(max_queue_jump_prefills=-1), "max_queue_jump_prefills"),
    (dict(max_queue_jump_prefills=math.nan), "max_queue_jump_prefills"),
    (dict(max_queue_jump_prefills=math.inf), "max_queue_jump_prefills"),
    (dict(ttl=NeverPin), r"an instance of NeverPin \(NeverPin\(\)\)"),
])
def test_a_scheduling_policy_built_wrongly_is_refused_naming_the_field(fields, match):
    # was: accepted, failing at the first memory pressure or sort ('str' object is not callable),
    # or (-1) queueing a turn behind its own arrival
    with pytest.raises(BadArgumentError, match=match):
        bundle(**fields)


def test_a_duck_typed_ttl_policy_is_told_every_method_it_lacks():
    # was: "it lacks ;" -- the list left out set_prior and on_lease_ended
    class Duck:
        name = "duck"

        def ttl(self, turn):
            return 1.0

        def offload(self, turn):
            return False

        def on_tool_return(self, tool, s):
            pass

        def on_admitted(self, d, e):
            pass

        def on_program_finished(self, n):
            pass

    with pytest.raises(BadArgumentError, match="it lacks set_prior, on_lease_ended"):
        bundle(ttl=Duck())


# ---- registering ----------------------------------------------------------------------------------
@pytest.fixture
def registry_snapshot():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.mark.parametrize("name", [5, "", " mine ", "a,b", "my policy", "fixed:mine"])
def test_a_name_no_one_could_select_is_refused(name, registry_snapshot):
    # was: accepted; an int name then broke every "unknown policy" message with a TypeError
    with pytest.raises(BadArgumentError, match="policy name"):
        register_policy(name, lambda **_: bundle())
    with pytest.raises(BadArgumentError, match="unknown policy 'nope'"):
        get_policy("nope")


@pytest.mark.parametrize("factory", [None, bundle(), SchedulingPolicy])
def test_a_factory_that_is_not_a_function_is_refused(factory, registry_snapshot):
    # was: accepted, then "unknown policy 'nc'; known: ..., nc, ..."
    with pytest.raises(BadArgumentError, match="the factory must be a function"):
        register_policy("nc", factory)


def test_a_name_can_be_registered_again_with_replace(registry_snapshot):
    register_policy("again", lambda **_: bundle(name="again"))
    with pytest.raises(BadArgumentError, match="replace=True"):
        register_policy("again", lambda **_: bundle(name="again"))
    register_policy("again", lambda **_: bundle(name="again", description="second"), replace=True)
    assert get_policy("again").description == "second"


def test_a_factory_gets_only_the_engine_facts_it_names(registry_snapshot):
    # was: a factory written to the documented (capacity_blocks, reload) failed in the simulator,
    # which also passes future
    seen = {}

    def by_the_doc(*, capacity_blocks=None, reload=None):
        seen.update(capacity_blocks=capacity_blocks)
        return bundle(name="doc")

    register_policy("doc", by_the_doc)
    assert get_policy("doc", capacity_blocks=7, reload=None, future=lambda p, t: None).name == "doc"
    assert seen == {"capacity_blocks": 7}
    register_policy("none", lambda: bundle(name="none"))
    assert get_policy("none", capacity_blocks=7).name == "none"


@pytest.mark.parametrize("factory, match", [
    (lambda **_: None, "its factory returned NoneType, not a SchedulingPolicy"),
    (lambda *, capacity_blocks: bundle(), "its factory raised TypeError"),
])
def test_a_factory_that_fails_is_a_policy_error_naming_it(factory, match, registry_snapshot):
    # was: load_config passed a factory returning None, and EngineKit then raised AttributeError
    register_policy("bad-factory", factory)
    with pytest.raises(PolicyError, match=f"policy 'bad-factory': {match}"):
        load_config({"policy": "bad-factory"})


def test_queue_entry_program_arrival_is_the_bounded_arrival_the_order_sees():
    # the review read "when its program's first turn arrived" and got a clipped value: the
    # docstring now says what the kit passes
    seen = []

    def order(entry):
        seen.append(entry)
        return request_fcfs(entry)

    k, engine, clock = kit_with(bundle(queue_order=order), max_queue_jump_s=2.0)
    k.arrived("a1", hints("A"), arrival=0.0)
    k.queue_key("A", 10.0)
    assert seen[-1].program_arrival == 8.0


# ---- a policy in the user's own module ------------------------------------------------------------
PLUGIN = '''
from kvttl.policy import SchedulingPolicy, TTLPolicy, program_fcfs, register_policy


class TwoSeconds(TTLPolicy):
    name = "two-seconds"

    def ttl(self, turn):
        return 2.0


register_policy("{name}", lambda **_: SchedulingPolicy(name="{name}", description="a plugin's",
                                                        ttl=TwoSeconds(), queue_order=program_fcfs))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch, request, registry_snapshot):
    """A module on sys.path that registers a policy as it is imported: (module, policy name)."""
    module = f"kvttl_test_plugin_{abs(hash(request.node.nodeid))}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name="plugin-policy"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module, "plugin-policy"
    import sys
    sys.modules.pop(module, None)


def test_a_config_names_modules_that_register_the_policy_it_selects(plugin):
    # was: no way for vllm serve's or SGLang's config to reach a policy in the user's code
    module, name = plugin
    config, _ = load_config({"policy_modules": [module], "policy": name})
    assert config.policy_modules == (module,)
    k = EngineKit(Engine(), num_blocks=32, block_size=16, config=config, clock=Clock())
    k.arrived("a1", hints("A"))
    assert finish(k, "a1").ttl_s == 2.0 and k.policy.name == name


def test_a_kit_config_built_in_code_imports_its_modules_too(plugin):
    module, name = plugin
    k = EngineKit(Engine(), num_blocks=32, block_size=16, config=KitConfig(policy=name, policy_modules=(module,)),
                  clock=Clock())
    assert k.policy.name == name


@pytest.mark.parametrize("modules, match", [
    (["kvttl_no_such_module"], "cannot import 'kvttl_no_such_module': ModuleNotFoundError"),
    (["not a module"], "is not a module name"),
    ([5], "is not a module name"),
    (5, "expected a list of module names"),
])
def test_policy_modules_that_cannot_be_imported_are_named(modules, match):
    with pytest.raises(BadArgumentError, match=f"kvttl config: policy_modules: .*{match}"):
        load_config({"policy_modules": modules, "policy": "kvttl"})


def test_simulate_imports_the_modules_given_with_import(plugin, capsys):
    # was: `kvttl simulate --policies mine` could only say "unknown policy 'mine'"
    from kvttl.cli import main

    module, name = plugin
    assert main(["simulate", "--import", module, "--policies", f"kvttl,{name}", "--jps", "0.2", "--programs", "4",
                 "--workers", "1", "--quiet"]) == 0
    assert name in capsys.readouterr().out


def test_simulate_names_a_module_it_cannot_import(capsys):
    from kvttl.cli import main

    assert main(["simulate", "--import", "kvttl_no_such_module", "--policies", "kvttl", "--quiet"]) == 2
    assert "--import: cannot import 'kvttl_no_such_module'" in capsys.readouterr().err


def test_the_readme_policy_example_runs(tmp_path, monkeypatch, registry_snapshot):
    import pathlib
    import re
    import sys

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n# mypkg/policies.py\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "kvttl_readme_policies.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        config, _ = load_config({"policy_modules": ["kvttl_readme_policies"], "policy": "pin-short-tools"})
        k = EngineKit(Engine(), num_blocks=32, block_size=16, config=config, clock=Clock())
        for key, tool in (("a1", "grep"), ("b1", "pytest")):
            k.arrived(key, hints(key.upper(), tool=tool))
        assert finish(k, "a1").ttl_s == 5.0 and finish(k, "b1").reason == "policy"
    finally:
        sys.modules.pop("kvttl_readme_policies", None)


def test_policy_failures_are_reported_with_the_kits_counters():
    from kvttl.kit.metrics import COUNTERS, StatsReporter

    k, engine, clock = kit_with(bundle(Pin(broken={"ttl"})))
    reporter = StatsReporter()
    reporter.report(k, {"offloaded_bytes": 0, "reloaded_bytes": 0}, 0)
    k.arrived("a1", hints("A"))
    finish(k, "a1")
    data = reporter.report(k, {"offloaded_bytes": 0, "reloaded_bytes": 0}, 0)
    assert "policy_errors" in COUNTERS and data["policy_errors"] == 1
