"""Fleets in the simulator (issue #14 item 1): N replicas behind a router."""

from __future__ import annotations

import pytest

from kvttl.errors import BadArgumentError
from kvttl.policy import get_policy
from kvttl.sim.cost import get_preset
from kvttl.sim.engine import EngineConfig, Simulator
from kvttl.sim.fleet import ROUTERS, Fleet
from kvttl.sim.runner import SweepConfig, run_sweep
from kvttl.sim.workload import generate, get_workload

COST = get_preset("llama-3.1-8b-h100")
ENGINE = EngineConfig()


def _programs(n=40, jps=0.4):
    return generate(get_workload("swe-bench"), n, jps, seed=3)


def _fleet(programs, policy, replicas, router, **kw):
    return Fleet(programs, lambda: get_policy(policy), COST, ENGINE, replicas=replicas, router=router, **kw)


@pytest.mark.parametrize("policy, rel", [("vllm", 1e-12), ("kvttl", 0.01)])
def test_one_replica_is_the_single_engine(policy, rel):
    """Stock is the same run exactly; with leases, the fleet's ticks split a
    few decode spans differently (measured: 0.25% of mean JCT)."""
    programs = _programs()
    single = Simulator(programs, get_policy(policy), COST, ENGINE).run().summary()
    fleet = _fleet(programs, policy, 1, "session").run().summary()
    assert fleet["num_programs"] == single["num_programs"]
    assert fleet["mean_jct_s"] == pytest.approx(single["mean_jct_s"], rel=rel)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_completes_every_program_and_leaks_nothing(router):
    fleet = _fleet(_programs(), "kvttl", 3, router)
    result = fleet.run()  # each replica's result checks its blocks and programs
    assert len(result.jct_s) == 40 and (result.jct_s > 0).all()
    if router == "session":
        assert fleet.moves == 0
    if router == "round-robin":
        assert fleet.moves > 0


def test_session_routing_keeps_the_pins_that_round_robin_throws_away():
    programs = _programs(60, 0.8)
    rr = _fleet(programs, "kvttl", 4, "round-robin").run().summary()
    session = _fleet(programs, "kvttl", 4, "session").run().summary()
    assert session["leases_hit"] > 2 * rr["leases_hit"]
    assert session["prefix_hit_rate"] > rr["prefix_hit_rate"]
    assert session["mean_jct_s"] < rr["mean_jct_s"]


def test_lease_aware_routing_gives_up_the_old_lease_when_a_program_moves():
    fleet = _fleet(_programs(60, 1.6), "kvttl", 4, "lease-aware", max_queue=0)
    fleet.run()
    assert fleet.moves > 0 and fleet.released > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 0, "router": "session"}, "replicas"),
    ({"replicas": 2, "router": "random"}, "unknown router"),
    ({"replicas": 2, "router": "session", "tick_s": 0}, "tick_s"),
])
def test_bad_fleet_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(BadArgumentError, match=message):
        Fleet(_programs(4), lambda: get_policy("vllm"), COST, ENGINE, **kwargs)


def test_simulate_sweeps_a_fleet():
    report = run_sweep(SweepConfig(policies=("vllm", "kvttl"), jps=(0.8,), num_programs=40, replicas=2,
                                   router="lease-aware", workers=1), progress=False)
    assert report["config"]["replicas"] == 2
    assert {r["policy"] for r in report["results"]} == {"vllm", "kvttl"}
    with pytest.raises(BadArgumentError, match="router"):
        run_sweep(SweepConfig(replicas=2, router="nope"), progress=False)


def test_a_lease_copies_out_the_context_it_pinned_not_where_its_program_has_since_gone():
    """Review finding: a lease left behind on a replica its program had moved
    from copied out the program's *current* context, which that replica never
    computed, and later reloads of it counted as host hits."""
    sim = Simulator(_programs(2), get_policy("kvttl"), COST, ENGINE)
    prog = sim.progs[0]
    shared = prog.program.shared_prefix_tokens // ENGINE.block_size  # the system prompt: any epoch's
    prog.context = (shared + 4) * ENGINE.block_size
    pinned = sim.kit.hooks.pin(prog)
    prog.context, prog.epoch = (shared + 10) * ENGINE.block_size, prog.epoch + 1  # its next turns ran elsewhere
    sim.kit.hooks.unpin(pinned, reason="expired", copy_out=True)
    old = sim.host.acquire_prefix(sim._hashes(prog, 0, shared + 10, content=pinned[2]))
    new = sim.host.acquire_prefix(sim._hashes(prog, 0, shared + 10))
    assert len(old) == shared + 4 and len(new) == shared
