"""The kit learns what a lost context costs from the engine's own steps and
host copies, and starts from the operator's priors (issue #17: TTLs that fit
the engine they run on)."""

from __future__ import annotations

import math

import pytest

from kvttl.errors import BadArgumentError
from kvttl.kit import EngineKit, KitConfig, load_config
from kvttl.kit.costs import HostCosts, StepCosts
from kvttl.policy import ReloadModel, SchedulingPolicy, TTLPolicy, TurnHints, program_fcfs
from tests.kit.test_kit import Clock, Engine


def steps(costs, *, step_s, tokens_per_s, sizes, repeat=50):
    for _ in range(repeat):
        for n in sizes:
            costs.observe(n, step_s + n / tokens_per_s)


def test_a_mix_of_decode_and_prefill_steps_gives_the_engines_line():
    costs = StepCosts(prior_tokens_per_s=10_000)
    steps(costs, step_s=0.02, tokens_per_s=2_000, sizes=(4, 8, 512, 2048))
    step_s, slope = costs.line()
    assert step_s == pytest.approx(0.02, rel=0.05)
    assert costs.tokens_per_s == pytest.approx(2_000, rel=0.05)


def test_without_a_spread_of_step_sizes_the_slope_stays_at_the_prior():
    costs = StepCosts(prior_tokens_per_s=10_000)
    assert costs.line() == (0.0, 1e-4)  # nothing seen: the prior
    steps(costs, step_s=0.05, tokens_per_s=1_000, sizes=(8,), repeat=500)  # decode only
    step_s, slope = costs.line()
    assert slope == pytest.approx(1e-4, rel=0.02) and step_s == pytest.approx(0.058 - 8e-4, rel=0.05)


def test_the_fit_follows_the_engine_when_its_speed_changes():
    costs = StepCosts(prior_tokens_per_s=10_000, window=200)
    steps(costs, step_s=0.01, tokens_per_s=20_000, sizes=(8, 1024))
    steps(costs, step_s=0.01, tokens_per_s=1_000, sizes=(8, 1024), repeat=1000)
    assert costs.tokens_per_s == pytest.approx(1_000, rel=0.05)


def test_a_chunked_prefill_pays_a_step_per_chunk():
    costs = StepCosts(prior_tokens_per_s=10_000, chunk_tokens=512)
    steps(costs, step_s=0.1, tokens_per_s=1_000, sizes=(8, 512))
    model = costs.prefill_model()
    assert model.prefill_s(2048) == pytest.approx(2048 / 1000 + 4 * 0.1, rel=0.05)


@pytest.mark.parametrize("tokens, seconds", [(-1, 0.1), (1.5, 0.1), (10, -0.1), (10, math.nan), (10, math.inf),
                                             (True, 0.1), ("10", 0.1)])
def test_bad_observations_are_refused_and_change_nothing(tokens, seconds):
    costs = StepCosts(prior_tokens_per_s=10_000)
    with pytest.raises(BadArgumentError):
        costs.observe(tokens, seconds)
    assert costs.num_steps == 0 and costs.line() == (0.0, 1e-4)
    with pytest.raises(BadArgumentError):
        HostCosts(kv_bytes_per_token=100).observe(tokens, seconds)


def test_host_bandwidth_is_bytes_over_seconds():
    host = HostCosts(kv_bytes_per_token=100)
    assert host.bytes_per_s == 0.0  # unknown until a copy was timed
    host.observe(4_000_000, 0.002)
    host.observe(2_000_000, 0.001)
    assert host.bytes_per_s == pytest.approx(2e9)


class Recorder(TTLPolicy):
    """Pins nothing; keeps what the kit told it about each turn."""

    name = "recorder"

    def __init__(self):
        self.turns = []
        self.priors = {}

    def ttl(self, turn):
        self.turns.append(turn)
        return 0.0

    def set_prior(self, tool, mean_s):
        self.priors[tool] = mean_s


def recording_kit(*, host=False, **kw):
    policy = SchedulingPolicy(name="recorder", description="records turns", ttl=Recorder(), queue_order=program_fcfs)
    kit = EngineKit(Engine(), num_blocks=32, block_size=16, policy=policy, clock=Clock(), has_host_tier=host, **kw)
    return kit, policy.ttl


def finish_one(kit, key="t1", num_tokens=2000):
    kit.arrived(key, TurnHints(program_id="P"))
    kit.finished(key, blocks=[1, 2], num_tokens=num_tokens, free_blocks=20)


def test_the_policy_sees_the_measured_prefill_cost():
    kit, recorder = recording_kit(config=KitConfig())
    finish_one(kit, "t1")
    assert recorder.turns[-1].prefill_s == pytest.approx(2000 / 10_000)  # the prior
    assert kit.prefill_tokens_per_s == pytest.approx(10_000)
    for _ in range(100):
        for n in (4, 256, 1024):
            kit.observe_step(n, 0.01 + n / 500)
    finish_one(kit, "t2")
    assert recorder.turns[-1].prefill_s == pytest.approx(2000 / 500, rel=0.05)
    assert kit.prefill_tokens_per_s == pytest.approx(500, rel=0.05)


def test_host_reload_cost_appears_once_copies_were_timed():
    kit, recorder = recording_kit(host=True, kv_bytes_per_token=1000)
    finish_one(kit, "t1")
    assert recorder.turns[-1].host_reload_s is None
    kit.observe_host_copy(10_000_000, 0.01)  # 1 GB/s
    finish_one(kit, "t2")
    assert recorder.turns[-1].host_reload_s == pytest.approx(2000 * 1000 / 1e9)


def test_measuring_off_or_a_known_reload_model_keeps_the_costs_fixed():
    off, rec_off = recording_kit(config=KitConfig(measure_costs=False))
    known = ReloadModel(b=1e-3)
    exact, rec_exact = recording_kit(reload=known)
    for kit in (off, exact):
        kit.observe_step(1024, 10.0)
        kit.observe_step(8, 0.01)
        finish_one(kit)
    assert rec_off.turns[-1].prefill_s == pytest.approx(0.2)
    assert rec_exact.turns[-1].prefill_s == pytest.approx(2.0) and exact.reload is known


def test_tool_priors_reach_the_policy_and_the_estimator():
    kit, recorder = recording_kit(config=KitConfig(tool_priors_s={"bash": 1.5, "*": 3.0}))
    assert recorder.priors == {"bash": 1.5, "*": 3.0}
    cont = EngineKit(Engine(), num_blocks=32, block_size=16, clock=Clock(),
                     config=KitConfig(policy="continuum", tool_priors_s={"bash": 20.0, "*": 0.5}))
    est = cont.policy.ttl.estimator
    assert est.mean("bash") == pytest.approx(20.0, rel=0.1) and est.mean("grep") == pytest.approx(0.5, rel=0.1)
    for _ in range(200):  # plenty of returns overall, none of bash's own: bash keeps its prior
        est.observe("grep", 0.2)
    assert est.stage("bash") == "prior" and est.stage("grep") == "tool" and est.stage("ls") == "global"


@pytest.mark.parametrize("value, names", [({"bash": 0}, "tool_priors_s['bash']"), ({"": 1}, "tool_priors_s"),
                                          ({"x" * 200: 1}, "tool_priors_s"), ([1], "tool_priors_s"),
                                          ({"bash": "2s"}, "tool_priors_s['bash']")])
def test_bad_tool_priors_fail_at_start_naming_the_key(value, names):
    with pytest.raises(BadArgumentError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_config({"tool_priors_s": value})


def test_measure_costs_must_be_a_bool():
    with pytest.raises(BadArgumentError, match="measure_costs"):
        load_config({"measure_costs": "yes"})
    assert load_config({"measure_costs": False})[0].measure_costs is False


def test_a_re_prefill_never_looks_free():
    """Decode steps of long contexts can cost more than small prefills; the slope stays above a floor
    (review finding: a zero slope made Reload(r) 0 and the queue-jump bound 0)."""
    from kvttl.kit.costs import MIN_SLOPE_SHARE

    costs = StepCosts(prior_tokens_per_s=1000.0)
    for _ in range(200):
        costs.observe(8, 0.05)  # slow decode steps
        costs.observe(2000, 0.01)  # a quick prefill
    assert costs.line()[1] == pytest.approx(MIN_SLOPE_SHARE / 1000.0)


def test_the_config_is_hashable_with_tool_priors():
    """From the #17 review: KitConfig held a dict, so it could not be hashed."""
    a = load_config({"tool_priors_s": {"bash": 1.5, "*": 2}})[0]
    b = KitConfig(tool_priors_s={"*": 2.0, "bash": 1.5})
    assert hash(a) == hash(b) and a == b and a.tool_priors_s == (("*", 2.0), ("bash", 1.5))
