"""Policy math against hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvttl.errors import BadArgumentError
from kvttl.policy import (
    ContinuumPreviewTTL,
    ContinuumTTL,
    DurationCDF,
    FixedTTL,
    GittinsOrder,
    InferCeptTTL,
    NeverPin,
    ProgramLengths,
    QueueEntry,
    ReloadModel,
    SlidingMean,
    ToolDurationEstimator,
    TurnContext,
    TurnCorrelation,
    continuum_tau,
    get_policy,
    least_attained_service,
    parse_ttl,
    policy_names,
    program_fcfs,
    register_policy,
    request_fcfs,
)


# ---- TTL hints -----------------------------------------------------------------------

@pytest.mark.parametrize("hint, seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("250ms", 0.25),
                                           (" 1.5m ", 90), (12, 12.0), (0.5, 0.5), ("0s", 0)])
def test_parse_ttl(hint, seconds):
    assert parse_ttl(hint) == pytest.approx(seconds)


@pytest.mark.parametrize("hint, words", [("5 minutes", ["not a duration"]), ("", ["not a duration"]),
                                         ("-5s", ["not a duration"]), ("1d", ["not a duration"]),
                                         (-1, ["non-negative"]), (math.nan, ["finite"]), (math.inf, ["finite"]),
                                         ("25h", ["above"]), (True, ["duration"]), (None, ["str or a number"]),
                                         ([5], ["str or a number"])])
def test_parse_ttl_rejects_garbage_clearly(hint, words):
    with pytest.raises(BadArgumentError) as info:
        parse_ttl(hint)
    for w in words:
        assert w in str(info.value)
    if isinstance(hint, str) and hint:
        assert repr(hint) in str(info.value)


# ---- tau* --------------------------------------------------------------------------------

def cdf(*samples):
    return DurationCDF(np.sort(np.array(samples, dtype=float)))


def test_cdf_counts_ties_to_the_last_sample():
    c = cdf(1, 1, 3)
    assert c(0.5) == 0 and c(1) == pytest.approx(2 / 3) and c(3) == 1
    assert c.at_support().tolist() == pytest.approx([2 / 3, 2 / 3, 1])


@pytest.mark.parametrize("samples, value, tau", [
    # F(1)=1/3, F(2)=2/3, F(4)=1. value 6: gains 1, 2, 2 -> the shorter of the tie, 2
    ((1, 2, 4), 6.0, 2.0),
    # value 12: gains 3, 6, 8 -> 4
    ((1, 2, 4), 12.0, 4.0),
    # value 3: gains 0, 0, -1 -> nothing beats not pinning
    ((1, 2, 4), 3.0, 0.0),
    # ties in the sample: F(1)=2/3, value 3: gains 1, 1, 0 -> 1
    ((1, 1, 3), 3.0, 1.0),
    ((1, 2, 4), 0.0, 0.0),
])
def test_continuum_tau_by_hand(samples, value, tau):
    assert continuum_tau(cdf(*samples), value) == tau


def test_continuum_ttl_uses_t_eta_and_reload():
    policy = ContinuumTTL(min_samples=3, window=10)
    for d in (1.0, 2.0, 4.0):
        policy.on_tool_return("bash", d)
    turn = TurnContext(program_id=1, tool="bash", prefill_s=3.0)
    assert policy.value_s(turn) == 3.0  # no evicted return yet: T = 0
    assert policy.ttl(turn) == 0.0      # value 3 -> see above
    policy.on_admitted(3.0, evicted=True)  # T = 3, eta = 1 (default) -> value 6
    policy.on_admitted(100.0, evicted=False)  # not evicted: not counted
    assert policy.value_s(turn) == 6.0 and policy.ttl(turn) == 2.0


def test_continuum_ttl_honours_hints():
    policy = ContinuumTTL()
    assert policy.ttl(TurnContext(program_id=1, hint_ttl_s=30.0)) == 30.0
    assert ContinuumTTL(honor_hints=False).ttl(TurnContext(program_id=1, hint_ttl_s=30.0)) == 0.0


def test_reload_is_the_cheaper_way_back():
    assert TurnContext(program_id=1, prefill_s=2.0).reload_s == 2.0
    assert TurnContext(program_id=1, prefill_s=2.0, host_reload_s=0.5).reload_s == 0.5


# ---- cold start and estimators ---------------------------------------------------------------

def test_cold_start_stages():
    est = ToolDurationEstimator(min_samples=3, window=5)
    assert est.stage("a") == "prior"
    est.observe("a", 1.0)
    est.observe("a", 1.0)
    assert est.stage("a") == "prior"
    est.observe("b", 9.0)  # 3 returns in total: the global CDF
    assert est.stage("a") == est.stage("b") == est.stage("new") == "global"
    assert est.cdf("a").support.tolist() == [1.0, 1.0, 9.0]
    est.observe("a", 2.0)  # a has 3 of its own
    assert est.stage("a") == "tool" and est.stage("b") == "global"
    assert est.cdf("a").support.tolist() == [1.0, 1.0, 2.0]


def test_prior_is_exponential_with_mean_one_second():
    est = ToolDurationEstimator()
    prior = est.cdf("anything")
    assert prior(1.0) == pytest.approx(1 - math.exp(-1), abs=1 / 64)
    assert est.mean("anything") == pytest.approx(1.0, rel=0.05)


def test_mixture_weighs_each_part():
    blend = DurationCDF.mixture([(1.0, cdf(1, 2)), (1.0, cdf(3)), (0.0, cdf(100))])  # weight 0: left out
    assert blend.support.tolist() == [1, 2, 3]
    assert blend(0.5) == 0 and blend(1) == pytest.approx(0.25) and blend(2.5) == pytest.approx(0.5) and blend(3) == 1
    assert blend.at_support().tolist() == pytest.approx([0.25, 0.5, 1.0])
    assert blend.mean() == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 3)
    assert blend.quantile(0.5) == 2 and blend.quantile(0.51) == 3 and blend.quantile(0.1) == 1
    ties = DurationCDF.mixture([(1.0, cdf(1)), (3.0, cdf(1, 2))])  # ties count to the last equal point
    assert ties.at_support().tolist() == pytest.approx([0.625, 0.625, 1.0])
    assert DurationCDF.mixture([(2.0, cdf(5))]).support.tolist() == [5]
    with pytest.raises(BadArgumentError, match="mixture"):
        DurationCDF.mixture([(0.0, cdf(1)), (1.0, cdf())])


def test_blended_estimate_lets_a_few_returns_outweigh_the_prior():
    """A new user's agents (5 programs x 6 turns, 25 returns) never left the
    1 s prior, so a tool that always took 1-2 s got pins of 0.46-0.68 s
    that could never hit. Blended, the returns seen count from the first."""
    staged = ToolDurationEstimator()
    blended = ToolDurationEstimator(prior_weight=10)
    durations = np.linspace(1.0, 2.0, 20)
    for d in durations:
        staged.observe("pytest", float(d))
        blended.observe("pytest", float(d))
    assert staged.stage("pytest") == blended.stage("pytest") == "prior"  # too few to call them known
    assert staged.cdf("pytest")(0.99) == pytest.approx(1 - math.exp(-0.99), abs=1 / 64)  # the prior alone
    # the prior weighs 10 of 30 returns at the tool level (and the global estimate it stands on, 10 of 30)
    assert blended.cdf("pytest")(0.99) == pytest.approx((1 - math.exp(-0.99)) * 10 / 30 * 10 / 30, abs=1 / 64)
    assert blended.cdf("pytest")(2.0) == pytest.approx(1 - (math.exp(-2.0)) * 10 / 30 * 10 / 30, abs=1 / 64)
    value = 2.5  # a hit saves 2.5 s
    assert 0 < continuum_tau(staged.cdf("pytest"), value) < 1.0  # a pin shorter than every call
    assert continuum_tau(blended.cdf("pytest"), value) == pytest.approx(2.0)  # long enough for every call
    # a tool never seen leans on all tools' returns, as far as they go
    assert blended.cdf("never")(2.0) == pytest.approx((20 + 10 * (1 - math.exp(-2.0))) / 30, abs=1 / 64)


def test_blended_estimate_keeps_a_named_prior_against_the_tools_own_returns_only():
    est = ToolDurationEstimator(prior_weight=5)
    for _ in range(200):
        est.observe("other", 0.1)
    est.set_prior("slow", 60.0)
    assert est.mean("slow") == pytest.approx(60.0, rel=0.05)  # others' returns do not move it
    for _ in range(45):
        est.observe("slow", 30.0)
    assert est.mean("slow") == pytest.approx((5 * 60.0 + 45 * 30.0) / 50, rel=0.05)
    # a tool never seen: all tools' returns, and the 1 s prior worth 5 of them
    assert est.mean("fresh") == pytest.approx((200 * 0.1 + 45 * 30.0 + 5 * 1.0) / 250, rel=0.05)
    est.set_prior("*", 10.0)  # the cache follows a new prior
    assert est.mean("fresh") == pytest.approx((200 * 0.1 + 45 * 30.0 + 5 * 10.0) / 250, rel=0.05)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_estimator_rejects_a_bad_prior_weight(bad):
    with pytest.raises(BadArgumentError, match="prior_weight"):
        ToolDurationEstimator(prior_weight=bad)


def test_window_bounds_memory_and_follows_drift():
    est = ToolDurationEstimator(min_samples=2, window=4)
    for d in range(10):
        est.observe("a", float(d))
    assert est.cdf("a").support.tolist() == [6.0, 7.0, 8.0, 9.0]
    assert est.tool_mean("a") == 7.5 and est.tool_mean("never") is None


# durations drawn from a few values, so that ties are common
_durations = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 7.25]) | st.floats(0, 100), max_size=60)


@settings(max_examples=200, deadline=None)
@given(_durations, st.integers(1, 9))
def test_window_holds_the_last_samples_sorted(durations, window):
    # the window keeps a numpy array it shifts in place: it must hold what sorting the tail would
    est = ToolDurationEstimator(min_samples=1, window=window)
    for d in durations:
        est.observe("a", d)
        assert est._tools["a"].cdf().support.tolist() == sorted(est._tools["a"].order)
    assert est._global.cdf().support.tolist() == sorted(durations[-window:])


@settings(max_examples=200, deadline=None)
@given(_durations.filter(len), _durations, st.floats(0.1, 50))
def test_at_support_counts_ties_to_the_last_equal_point(first, second, weight):
    # at_support finds each run of equal points in one pass; F by definition is a search per point
    plain = DurationCDF(np.sort(np.asarray(first)))
    cdfs = [plain]
    if second:
        cdfs.append(DurationCDF.mixture([(weight, plain), (len(second), DurationCDF(np.sort(np.asarray(second))))]))
    for cdf in cdfs:
        by_search = [cdf(t) for t in cdf.support]
        assert cdf.at_support().tolist() == by_search


def test_unknown_tool_names_are_bounded():
    est = ToolDurationEstimator(min_samples=1, window=4, max_tools=3)
    for i in range(10):
        est.observe(f"tool{i}", 1.0)
    assert len(est._tools) <= 4


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "3s", None])
def test_estimator_rejects_bad_durations(bad):
    with pytest.raises(BadArgumentError, match="duration"):
        ToolDurationEstimator().observe("a", bad)


def test_estimator_rejects_bad_settings():
    with pytest.raises(BadArgumentError):
        ToolDurationEstimator(min_samples=10, window=5)
    with pytest.raises(BadArgumentError):
        ToolDurationEstimator(prior_mean_s=0)


def test_eta_is_one_when_every_program_has_the_same_length():
    corr = TurnCorrelation(min_programs=2)
    assert corr.eta == 1.0  # default while cold
    for _ in range(3):
        corr.add_program(4)
    assert corr.eta == pytest.approx(1.0)


def test_eta_matches_numpy_on_mixed_programs():
    rng = np.random.default_rng(3)
    corr = TurnCorrelation(min_programs=1)
    ks, rs = [], []
    for n in rng.integers(1, 30, 50):
        corr.add_program(int(n))
        ks += list(range(1, n + 1))
        rs += [n - k for k in range(1, n + 1)]
    expected = -np.corrcoef(ks, rs)[0, 1]
    assert corr.eta == pytest.approx(max(0.0, min(1.0, expected)), abs=1e-9)
    with pytest.raises(BadArgumentError):
        corr.add_program(0)


def test_eta_follows_the_programs_of_today_not_of_last_week():
    """Issue #17 item 3 (the same workload gets the same leases whatever the
    server served before): eta summed every program ever finished, so a
    server that had run many fixed-length programs kept eta near 1 long
    after its programs' lengths became unpredictable."""
    rng = np.random.default_rng(7)
    today = [int(n) for n in rng.geometric(0.15, 300)]
    used, fresh = TurnCorrelation(window=256), TurnCorrelation(window=256)
    for _ in range(5000):
        used.add_program(40)  # last week: every program 40 turns
    for n in today:
        used.add_program(n)
        fresh.add_program(n)
    assert used.programs == fresh.programs == 256
    assert used.eta == pytest.approx(fresh.eta, abs=1e-12) and fresh.eta < 0.6
    with pytest.raises(BadArgumentError):
        TurnCorrelation(window=5, min_programs=10)
    with pytest.raises(BadArgumentError):
        used.add_program(2.5)


def test_sliding_mean():
    m = SlidingMean(3)
    assert m.mean(default=7.0) == 7.0
    for x in (1, 2, 3, 4):
        m.add(x)
    assert m.mean() == 3.0 and len(m) == 3


# ---- the other TTL policies -------------------------------------------------------------------

def test_simple_policies():
    turn = TurnContext(program_id="p", tool="bash")
    assert NeverPin().ttl(turn) == 0.0
    assert FixedTTL(2.5).ttl(turn) == 2.5
    with pytest.raises(BadArgumentError):
        FixedTTL(-1)


def test_continuum_preview_rule():
    policy = ContinuumPreviewTTL()
    assert policy.ttl(TurnContext(program_id=1, tool="new")) == 2.0  # unknown tools are pinned
    policy.on_tool_return("fast", 1.0)
    policy.on_tool_return("fast", 2.0)
    policy.on_tool_return("slow", 5.0)
    assert policy.ttl(TurnContext(program_id=1, tool="fast")) == 2.0  # mean 1.5 <= 2
    assert policy.ttl(TurnContext(program_id=1, tool="slow")) == 0.0


def test_infercept_preserve_discard_swap():
    policy = InferCeptTTL()
    short = TurnContext(program_id=1, tool="t", num_tokens=1000, prefill_s=0.5, used_tokens=10_000)
    assert policy.ttl(short) == math.inf and not policy.offload(short)  # waste 1000*~1 < 0.5*10000
    for _ in range(200):
        policy.on_tool_return("t", 100.0)
    assert policy.ttl(short) == 0.0 and not policy.offload(short)  # preserve 1e5 > discard 5000
    swap = TurnContext(program_id=1, tool="t", num_tokens=1000, prefill_s=0.5, host_reload_s=0.01, used_tokens=10_000)
    assert policy.ttl(swap) == 0.0 and policy.offload(swap)  # swap 2*0.01*10000 = 200


# ---- orders ------------------------------------------------------------------------------------

def test_queue_orders():
    new_program_early_turn = QueueEntry(request_arrival=5.0, program_arrival=4.0, has_lease=False, attained_service_s=0.0)
    old_program_late_turn = QueueEntry(request_arrival=9.0, program_arrival=1.0, has_lease=False, attained_service_s=50.0)
    pinned = QueueEntry(request_arrival=10.0, program_arrival=3.0, has_lease=True, attained_service_s=20.0)
    entries = [new_program_early_turn, old_program_late_turn, pinned]
    assert sorted(entries, key=request_fcfs) == [new_program_early_turn, old_program_late_turn, pinned]
    assert sorted(entries, key=program_fcfs) == [pinned, old_program_late_turn, new_program_early_turn]
    assert sorted(entries, key=least_attained_service) == [new_program_early_turn, pinned, old_program_late_turn]


# ---- reload model ---------------------------------------------------------------------------------

def test_reload_model_fit_recovers_a_quadratic():
    n = np.array([1000, 4000, 16000, 64000])
    t = 0.01 + 2e-5 * n + 3e-10 * n**2
    m = ReloadModel.fit(n, t, kv_bytes_per_token=131072, host_bytes_per_s=50e9)
    assert m.prefill_s(32000) == pytest.approx(0.01 + 2e-5 * 32000 + 3e-10 * 32000**2, rel=1e-6)
    assert m.host_reload_s(50_000) == pytest.approx(50_000 * 131072 / 50e9)
    assert ReloadModel().host_reload_s(10) is None
    with pytest.raises(BadArgumentError, match=">= 3"):
        ReloadModel.fit([1, 2], [1, 2])
    with pytest.raises(BadArgumentError, match="finite"):
        ReloadModel.fit([1, 2, math.nan], [1, 2, 3])


# ---- registry ----------------------------------------------------------------------------------------

def test_registry():
    names = policy_names()
    for name in ("vllm", "vllm-lmcache", "autellix", "infercept", "continuum-preview", "continuum", "kvttl"):
        assert name in names
        assert get_policy(name).name == name
    assert get_policy("fixed:5m").ttl.ttl(TurnContext(program_id=1)) == 300.0
    with pytest.raises(BadArgumentError, match="known: .*continuum"):
        get_policy("contnuum")
    with pytest.raises(BadArgumentError, match="not a duration"):
        get_policy("fixed:soon")
    with pytest.raises(BadArgumentError, match="already registered"):
        register_policy("vllm", lambda **_: None)


def test_each_bundle_gets_fresh_learning_state():
    a, b = get_policy("continuum"), get_policy("continuum")
    a.ttl.on_tool_return("x", 1.0)
    assert b.ttl.estimator.num_observed == 0
    a, b = get_policy("kvttl"), get_policy("kvttl")
    a.queue_order.on_program_finished(3)
    assert len(a.queue_order.lengths) == 1 and len(b.queue_order.lengths) == 0


# ---- the Gittins order (issue #13: program FCFS lost to request FCFS on mixed lengths) ------------

def _brute_gittins(lengths, k):
    rest = [n - k for n in lengths if n > k]
    if not rest:
        return None
    return max(sum(r <= d for r in rest) / sum(min(r, d) for r in rest) for d in range(1, max(rest) + 1))


def test_gittins_index_by_hand():
    same = ProgramLengths(min_programs=1)
    for _ in range(5):
        same.add(4)
    # every program has 4 turns: the one with k done has 4 - k to go, for sure
    assert [same.index(k) for k in range(4)] == pytest.approx([1 / 4, 1 / 3, 1 / 2, 1.0])
    split = ProgramLengths(min_programs=1)
    for n in (1, 20) * 3:
        split.add(n)
    # half end after one turn, half run 20: a new program is the better bet than one that survived
    assert split.index(0) == pytest.approx(0.5) and split.index(1) == pytest.approx(1 / 19)


def test_gittins_index_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(50):
        lengths = [int(x) for x in rng.integers(1, 30, size=int(rng.integers(1, 40)))]
        table = ProgramLengths(min_programs=1)
        for n in lengths:
            table.add(n)
        for k in range(0, 32):
            want, got = _brute_gittins(lengths, k), table.index(k)
            assert (got is None) if want is None else got == pytest.approx(want)


def test_program_lengths_cold_start_window_and_bad_input():
    table = ProgramLengths(window=4, min_programs=3)
    table.add(2)
    table.add(2)
    assert table.index(0) is None  # too few programs finished to know anything
    table.add(2)
    assert table.index(1) == pytest.approx(1.0) and table.index(2) is None  # none ran past 2: not known
    for _ in range(4):
        table.add(10)  # the window holds the last 4 only: the 2-turn programs are gone
    assert len(table) == 4 and table.index(1) == pytest.approx(1 / 9)
    for bad in (0, -3, 2.5, True, "4", None):
        with pytest.raises(BadArgumentError, match="number of turns"):
            table.add(bad)
    assert len(table) == 4 and table.index(1) == pytest.approx(1 / 9)  # nothing changed
    with pytest.raises(BadArgumentError, match="min_programs"):
        ProgramLengths(window=2, min_programs=3)


def _entry(arrival, program_arrival, turns_done, *, lease=False):
    return QueueEntry(arrival, program_arrival, lease, 0.0, turns_done)


def test_gittins_order():
    order = GittinsOrder(ProgramLengths(min_programs=2))
    old_program, new_program = _entry(9.0, 1.0, turns_done=1), _entry(8.0, 5.0, turns_done=0)
    # cold start: nothing finished yet, so program FCFS with aging (the aged arrival is the key)
    assert sorted([new_program, old_program], key=order) == [old_program, new_program]
    assert order(old_program)[1] == 1.0
    for n in (1, 20) * 3:
        order.on_program_finished(n)
    # half the programs end after one turn: G(0) = 1/2, G(1) = 1/19. The program that survived
    # its first turn is a worse bet than a new one, so it does not move: request FCFS
    assert order(new_program)[1] == 8.0 and order(old_program)[1] == 9.0
    pinned, plain = _entry(10.0, 4.0, turns_done=1, lease=True), _entry(8.5, 8.5, 0)
    # pinned first; a request without a program does not move, and goes before a turn far from its end
    assert sorted([old_program, new_program, plain, pinned], key=order) == [pinned, new_program, plain, old_program]
    # a turn never moves further than its aged arrival, nor behind its own arrival
    for e in (old_program, new_program, plain, pinned):
        assert e.program_arrival <= order(e)[1] <= e.request_arrival
    # longer than every program seen: ranked as a new one
    assert order(_entry(12.0, 0.5, turns_done=25)) == order(_entry(12.0, 0.5, turns_done=0))


def test_gittins_order_moves_a_program_as_far_as_it_is_a_better_bet_than_a_new_one():
    order = GittinsOrder(ProgramLengths(min_programs=1))
    for _ in range(5):
        order.on_program_finished(4)
    # every program runs 4 turns: G(0) = 1/4, G(2) = 1/2, G(3) = 1. A program with 2 done moves
    # half of its 10 s of aging (1 - (1/4)/(1/2)), one whose next turn is its last three quarters
    assert order(_entry(20.0, 10.0, turns_done=2))[1] == pytest.approx(15.0)
    assert order(_entry(20.0, 10.0, turns_done=3))[1] == pytest.approx(12.5)
    assert order(_entry(20.0, 10.0, turns_done=0))[1] == 20.0  # a first turn never moves


# ---- turn hints and the tool parser (shared by the engine adapters) ------------------------

from kvttl.policy import parse_turn_hints, tool_from_output  # noqa: E402


def test_turn_hints_parse_and_validate():
    h = parse_turn_hints({"program_id": "agent-1", "tool": "bash", "last_turn": "true", "ttl": "5m"})
    assert (h.program_id, h.tool, h.last_turn, h.ttl_s, h.warnings) == ("agent-1", "bash", True, 300.0, ())
    assert parse_turn_hints({}) is None and parse_turn_hints(None) is None
    assert parse_turn_hints({"program_id": None}) is None  # no program: the normal path
    h = parse_turn_hints({"program_id": 7, "ttl": "-1s", "tool": 5})
    assert h.ttl_s is None and h.tool == "" and len(h.warnings) == 2 and "ttl ignored" in h.warnings[0]
    for bad, match in [({"program_id": True}, "program_id"), ({"program_id": " "}, "empty"),
                       ({"program_id": 2**64}, "64 bits"), ({"program_id": 1.5}, "program_id"), ([1], "mapping")]:
        with pytest.raises(BadArgumentError, match=match):
            parse_turn_hints(bad)


def test_a_tool_name_with_control_characters_is_ignored_with_a_warning():
    """The README promises tool names without control characters (they end up
    in logs, metrics labels and the estimator's keys); a hint with one was taken
    as is, as was a name read from the output or an operator's prior."""
    h = parse_turn_hints({"program_id": "A", "tool": "ba\x1bsh\n"})
    assert h.tool == "" and len(h.warnings) == 1 and "control characters" in h.warnings[0]
    assert parse_turn_hints({"program_id": "A", "tool": "bash:ls"}).tool == "bash:ls"
    assert tool_from_output('<tool_call>{"name": "se\x1barch", "arguments": {}}</tool_call>') == ""
    assert tool_from_output("```bash\nl\x07s -la\n```") == ""
    # C1 controls and line separators too; a decoded JSON name with a lone surrogate or over 128 bytes
    # is no tool (the lease table refuses it: a model's output must not make a grant raise)
    assert parse_turn_hints({"program_id": "A", "tool": "se\x85arch"}).tool == ""
    assert parse_turn_hints({"program_id": "A", "tool": "a\u2028b"}).tool == ""
    with pytest.raises(BadArgumentError, match="control characters"):
        parse_turn_hints({"program_id": "a\x9b31m"})
    assert tool_from_output('{"name": "x\\ud800' + "a" * 130 + '", "arguments": {}}') == ""
    assert tool_from_output(json.dumps({"name": "検索" * 64, "arguments": {}})) == ""
    assert tool_from_output(json.dumps({"name": "検索", "arguments": {}}, ensure_ascii=False)) == "検索"
    from kvttl.kit import load_config

    with pytest.raises(BadArgumentError, match="tool_priors_s"):
        load_config({"tool_priors_s": {"ba\tsh": 1.0}})


@pytest.mark.parametrize("text, tool", [
    ("THOUGHT: run the tests\n```bash\ncd /repo && FOO=1 python -m pytest -q\n```", "bash:cd"),
    ("```bash\n# look around first\nls -la\n```", "bash:ls"),
    ("```sh\n/usr/bin/grep -rn foo .\n```", "bash:grep"),
    ("```bash\n```", "bash"),
    ("```bash\nls\n```\nand\n```bash\npwd\n```", ""),  # two actions: mini-swe-agent rejects those too
    ('<tool_call>\n{"name": "web_search", "arguments": {"q": "x"}}\n</tool_call>', "web_search"),
    ('{"name": "read_file", "arguments": "{}"}', "read_file"),
    ("The answer is 42.", ""),
    ("", ""),
])
def test_tool_from_output(text, tool):
    assert tool_from_output(text) == tool


# ---- kvttl's TTL and the oracle (issue #13) ----------------------------------------------------

def test_kvttl_believes_a_hint_only_as_far_as_the_evidence_goes():
    """Wrong 1-hour hints made every pin an hour long (continuum got better
    when clients lied; kvttl lost 2.4% on the wrong-hints workload)."""
    from kvttl.policy import KvttlTTL

    policy = KvttlTTL(min_samples=10)
    hour = TurnContext(program_id=1, tool="cat", hint_ttl_s=3600.0, prefill_s=10.0)
    assert policy.ttl(hour) == 3600.0  # no evidence yet: the client may know best
    for d in np.linspace(0.1, 2.0, 50):
        policy.on_tool_return("cat", float(d))
    # cut to the 99th percentile of the estimate: the 50 returns, and the prior worth a few percent of them
    assert policy.ttl(hour) == policy.estimator.cdf("cat").quantile(0.99) == 2.0
    short = TurnContext(program_id=1, tool="cat", hint_ttl_s=0.05, prefill_s=10.0)
    assert policy.ttl(short) == 0.05  # a shorter hint is kept
    continuum = ContinuumTTL(min_samples=10)
    for d in np.linspace(0.1, 2.0, 50):
        continuum.on_tool_return("cat", float(d))
    plain = TurnContext(program_id=1, tool="cat", prefill_s=10.0)
    assert policy.ttl(plain) == continuum.ttl(plain) > 0  # without a hint: Continuum's tau*


def test_kvttl_values_a_pin_by_its_chance_of_not_being_revoked():
    """Pins are soft: on a server that revokes half its leases, a pin is
    worth half of Eq. 2's value, so tau* pins for fewer tools' durations."""
    from kvttl.policy import KvttlTTL

    policy = KvttlTTL(min_samples=10)
    for d in np.concatenate([np.linspace(0.1, 0.2, 50), np.linspace(1.0, 1.1, 50)]):
        policy.on_tool_return("cat", float(d))  # half the calls take 0.1-0.2 s, half 1.0-1.1 s
    turn = TurnContext(program_id=1, tool="cat", prefill_s=3.0)  # a hit saves 3 s: wait for both
    kept = policy.ttl(turn)
    full = policy.value_s(turn)
    for _ in range(KvttlTTL.revocation_min_samples - 1):
        policy.on_lease_ended("revoked")
    assert policy.revoked_share() == 0.0 and policy.ttl(turn) == kept  # too few ends to judge
    for reason in ("released", "expired") * 16 + ("revoked",):
        policy.on_lease_ended(reason)
    assert policy.revoked_share() == pytest.approx(0.5)
    assert policy.value_s(turn) == pytest.approx(full / 2)
    assert kept == pytest.approx(1.1) and policy.ttl(turn) == pytest.approx(0.2)  # worth 1.5 s: the short ones
    for _ in range(KvttlTTL.revocation_window):
        policy.on_lease_ended("released")
    assert policy.revoked_share() == 0.0 and policy.ttl(turn) == kept  # the window forgets


def test_the_oracle_pins_exactly_the_turns_that_return_while_a_pin_pays():
    from kvttl.policy import OracleTTL

    future = {(1, 0): 0.5, (1, 1): 50.0, (1, 2): None}
    oracle = OracleTTL(lambda pid, turn: future[(pid, turn)])
    turn = lambda i: TurnContext(program_id=1, turn_index=i, prefill_s=2.0, hint_ttl_s=3600.0)  # noqa: E731
    assert oracle.ttl(turn(0)) == pytest.approx(0.5, abs=1e-5)  # returns in 0.5 s, a re-prefill costs 2: pin
    assert oracle.ttl(turn(1)) == 0.0  # 50 s of pinned memory to save 2 s: no
    assert oracle.ttl(turn(2)) == 0.0  # the last turn: nothing returns
    oracle.on_admitted(60.0, evicted=True)  # evicted turns queue for a minute: now a hit saves 62 s
    assert oracle.ttl(turn(1)) == pytest.approx(50.0, abs=1e-5)


def test_only_a_replay_can_run_the_oracle():
    from kvttl.kit import load_config

    with pytest.raises(BadArgumentError, match="clairvoyant"):
        get_policy("oracle")
    with pytest.raises(BadArgumentError, match="clairvoyant"):
        load_config({"policy": "oracle"})  # an engine's config cannot name it
    bundle = get_policy("oracle", future=lambda pid, turn: None)
    kvttl = get_policy("kvttl")
    assert (type(bundle.queue_order), bundle.offload, bundle.revokes, bundle.max_queue_jump_prefills) == (
        type(kvttl.queue_order), kvttl.offload, kvttl.revokes, kvttl.max_queue_jump_prefills)
    assert bundle.queue_order is not kvttl.queue_order  # each learns its own program lengths
