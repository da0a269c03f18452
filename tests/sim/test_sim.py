"""The simulator: invariants, determinism, the effect it exists to show, and
its inputs (cost model, workloads, traces, CLI)."""

from __future__ import annotations

import json
import math
from importlib import resources

import attrs
import numpy as np
import pytest

from kvttl.cli import main
from kvttl.errors import BadArgumentError
from kvttl.policy import get_policy
from kvttl.sim import (
    PRESETS,
    EngineConfig,
    Program,
    Simulator,
    Turn,
    generate,
    get_preset,
    get_workload,
    load_trace,
    load_workload_spec,
    replay_future,
)

H100 = get_preset("llama-3.1-8b-h100")
DATA = resources.files("kvttl.sim") / "data"


def run(programs, policy, *, blocks=None, host_gb=0.0, jps=0.2):
    cost = H100
    config = EngineConfig(num_gpu_blocks=blocks, host_tier_gb=host_gb)
    facts = dict(capacity_blocks=blocks or cost.num_gpu_blocks(16), reload=cost.reload_model(8192),
                 future=replay_future(programs))
    sim = Simulator(programs, get_policy(policy, **facts), cost, config, jps=jps)
    return sim, sim.run()


# ---- cost model --------------------------------------------------------------------------

def test_gpu_blocks_from_memory():
    usable = 81559 * 1024**2 * 0.9 - 4 * 1024**3 - 8.03e9 * 2  # the 80 GB part: 81559 MiB
    assert H100.num_gpu_blocks(16) == int(usable // (2 * 32 * 8 * 128 * 2 * 16))
    assert PRESETS["llama-3.1-70b-4xh100"].num_gpu_blocks(16) > 0


def test_step_time_roofline():
    # one decode token, no KV: weights streamed once, plus the step overhead
    assert H100.step_s(1, 0, 0) == pytest.approx(8.03e9 * 2 / (3.35e12 * 0.7) + 1e-3)
    # a big prefill chunk is compute-bound
    t = H100.step_s(8192, 8192 * 4096, 8192)
    assert t == pytest.approx((2 * 8.03e9 * 8192 + 4 * 32 * 32 * 128 * 8192 * 4096) / (989.4e12 * 0.4) + 1e-3)
    assert PRESETS["llama-3.1-8b-h200"].step_s(64, 0, 64 * 30000) < H100.step_s(64, 0, 64 * 30000)
    tp = PRESETS["llama-3.1-70b-4xh100"]
    assert tp.step_s(512, 0, 0) > 0


def test_the_cost_model_matches_measured_engines():
    """Issue #13 item 3: 8B/H100 prefilled 32.5k tokens/s (vLLM measures
    15-22k) and 70B/4xH100 decoded in 15.8 ms/token (measured: 20-25)."""
    prefill = 8192 / H100.step_s(8192, 8192 * (4096 + 4096), 8192 + 4096)
    assert 15e3 <= prefill <= 22e3
    decode_70b = PRESETS["llama-3.1-70b-4xh100"].step_s(1, 2000, 2000)
    assert 20e-3 <= decode_70b <= 25e-3


def test_concurrent_host_reloads_share_the_link():
    """Two programs back from their tools at once, both contexts evicted
    meanwhile and on the host tier: the second reload waits for the first
    (one host link per GPU; each had the whole link before)."""
    turns = (Turn(prompt_tokens=16000, output_tokens=16, tool="t", tool_duration_s=5.0),
             Turn(prompt_tokens=16100, output_tokens=16))
    programs = [Program(program_id=0, arrival_s=0.0, turns=turns), Program(program_id=1, arrival_s=0.0, turns=turns),
                Program(program_id=2, arrival_s=1.0, turns=(Turn(prompt_tokens=32000, output_tokens=16),))]
    config = EngineConfig(num_gpu_blocks=2100, host_tier_gb=64.0, max_num_batched_tokens=32768)  # one step each
    sim = Simulator(programs, get_policy("vllm-lmcache"), H100, config, jps=1.0)
    reloads = []
    admit = sim._try_admit

    def recording(req, budget):
        chunk = admit(req, budget)
        if chunk == 0 and req.turn == 1:
            reloads.append(req.ready_at - sim.now)
        return chunk

    sim._try_admit = recording
    result = sim.run()
    assert result.host_reloaded_tokens > 0 and len(reloads) == 2
    one = H100.host_reload_s(999 * 16)  # the blocks before the one holding the last prompt token
    assert reloads[0] == pytest.approx(one, rel=0.01) and reloads[1] == pytest.approx(2 * one, rel=0.01)
    # what reloading ahead of time could save: both waits, the second's queueing included
    assert result.host_reload_wait_s == pytest.approx(3 * one, rel=0.01)
    assert result.summary()["host_reload_wait_s"] == result.host_reload_wait_s


def _two_programs_one_host_context():
    """Program 0 calls a 5 s tool; program 1, a second later, a long one. Their
    first turns do not fit on the device together."""
    def turns(tool_s):
        return (Turn(prompt_tokens=16000, output_tokens=16, tool="t", tool_duration_s=tool_s),
                Turn(prompt_tokens=16100, output_tokens=16))
    return [Program(program_id=0, arrival_s=0.0, turns=turns(5.0)),
            Program(program_id=1, arrival_s=1.0, turns=turns(100.0))]


def test_a_host_tier_too_small_to_keep_a_context_counts_what_it_lost():
    """The tier holds one 16k-token context: the second program's copy evicts
    the first's, which comes back and re-prefills it; the second's survives."""
    bs, context_blocks = 16, 16016 // 16  # the first turn's full blocks, all copied at its finish
    tier_gb = context_blocks * bs * H100.model.kv_bytes_per_token / 1e9
    config = EngineConfig(num_gpu_blocks=1100, host_tier_gb=tier_gb, max_num_batched_tokens=32768)
    result = Simulator(_two_programs_one_host_context(), get_policy("vllm-lmcache"), H100, config, jps=1.0).run()
    returned = (16016 - 1) // bs * bs  # what a returning turn can find: not the block of its last token
    on_device = (1100 - context_blocks) * bs  # the leading blocks the second program did not need
    assert result.host_lost_tokens == result.reprefilled_tokens == returned - on_device
    assert result.host_reloaded_tokens > returned // 2  # the second program's copy came back, re-prefilled none
    roomy = attrs.evolve(config, host_tier_gb=2 * tier_gb)
    result = Simulator(_two_programs_one_host_context(), get_policy("vllm-lmcache"), H100, roomy, jps=1.0).run()
    assert result.host_lost_tokens == result.reprefilled_tokens == 0 and result.host_reloaded_tokens > returned


def test_a_turn_routed_to_another_replica_is_not_a_host_tier_loss():
    """From review: replicas share their programs' state, not their host tiers;
    a turn that moved re-prefilled, and a fleet with a huge tier was told it was too small."""
    from kvttl.sim.fleet import Fleet

    config = EngineConfig(num_gpu_blocks=1100, host_tier_gb=1000.0, max_num_batched_tokens=32768)
    result = Fleet(_two_programs_one_host_context(), lambda: get_policy("vllm-lmcache"), H100, config,
                   replicas=3, router="round-robin", jps=1.0).run()  # every second turn moves
    assert result.reprefilled_tokens > 0 and result.host_lost_tokens == 0


def test_reload_model_matches_chunked_prefill_cost():
    reload = H100.reload_model(8192)
    n = 65536
    steps = sum(H100.step_s(8192, 8192 * (i * 8192 + 4096), 0) for i in range(n // 8192))
    assert reload.prefill_s(n) == pytest.approx(steps, rel=0.05)


def test_preset_files(tmp_path):
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"model": "llama-3.1-8b-h100", "gpu": {"name": "X", "peak_flops": 5e14,
                                "hbm_bytes_per_s": 2e12, "memory_bytes": 48e9, "host_bytes_per_s": 25e9}, "tp": 1}))
    cost = get_preset(str(spec))
    assert cost.gpu.name == "X" and cost.num_gpu_blocks(16) < H100.num_gpu_blocks(16)
    with pytest.raises(BadArgumentError, match="known: llama-3.1-8b-h100"):
        get_preset("a100")
    spec.write_text(json.dumps({"model": "llama-3.1-8b-h100", "gpu": {"name": "X", "peak_flops": -1}}))
    with pytest.raises(BadArgumentError):
        get_preset(str(spec))
    spec.write_text(json.dumps({"model": {"name": "huge", "num_params": 1e12, "num_layers": 100, "hidden_size": 1,
                                          "num_heads": 1, "num_kv_heads": 1, "head_dim": 1}, "gpu": "llama-3.1-8b-h100"}))
    with pytest.raises(BadArgumentError, match="does not fit"):
        get_preset(str(spec)).num_gpu_blocks(16)


# ---- workloads ------------------------------------------------------------------------------

def test_generator_is_deterministic_and_load_only_scales_arrivals():
    spec = get_workload("swe-bench")
    a, b = generate(spec, 20, 0.1, seed=3), generate(spec, 20, 0.1, seed=3)
    assert a == b
    c = generate(spec, 20, 0.2, seed=3)
    assert [p.turns for p in a] == [p.turns for p in c]
    assert [p.arrival_s / 2 for p in a] == pytest.approx([p.arrival_s for p in c])
    assert generate(spec, 20, 0.1, seed=4) != a


def test_swe_bench_generator_matches_its_sources():
    programs = generate(get_workload("swe-bench"), 400, 1.0, seed=0)
    turns = np.array([len(p.turns) for p in programs])
    final = np.array([p.turns[-1].prompt_tokens + p.turns[-1].output_tokens for p in programs])
    tools = np.array([t.tool_duration_s for p in programs for t in p.turns[:-1]])
    assert 10 <= turns.mean() <= 12 and turns.max() <= 50 and turns.min() >= 1
    assert 55_000 <= final.mean() <= 85_000 and 12_000 <= final.std() <= 35_000
    assert 0.15 <= np.percentile(tools, 50) <= 0.5 and 5 <= np.percentile(tools, 90) <= 30
    for p in programs:
        prompts = [t.prompt_tokens for t in p.turns]
        assert prompts == sorted(prompts)  # contexts only grow
        assert p.turns[-1].tool is None and all(t.tool for t in p.turns[:-1])


def test_spec_file_overrides(tmp_path):
    toml = tmp_path / "short.toml"
    toml.write_text('base = "bfcl"\nmean_turns = 3.0\nmax_turns = 5\n'
                    '[[tools]]\nname = "db"\nweight = 1.0\nmedian_s = 0.5\nsigma = 0.1\n')
    spec = load_workload_spec(toml)
    assert spec.name == "short" and spec.mean_turns == 3.0 and spec.initial_tokens_median == 1500
    programs = generate(spec, 50, 1.0)
    assert max(len(p.turns) for p in programs) <= 5
    assert {t.tool for p in programs for t in p.turns[:-1]} == {"db"}
    js = tmp_path / "w.json"
    js.write_text(json.dumps({"mean_turns": 4.0}))
    assert get_workload(str(js)).observation_tokens_median == get_workload("swe-bench").observation_tokens_median


@pytest.mark.parametrize("content, words", [
    ('mean_turns = 3\nturns = 9\n', ["unknown fields", "turns"]),
    ('base = "nope"\n', ["base must be one of"]),
    ('mean_turns = 80\n', ["mean_turns <= max_turns"]),
    ('[[tools]]\nname = "x"\n', ["tools"]),
    ('mean_turns = = 3', ["w.toml"]),
    ('[[tools]]\nname = "ba\\tsh"\nweight = 1\nmedian_s = 1\nsigma = 0.5\n', ["control characters"]),
])
def test_bad_spec_files(tmp_path, content, words):
    path = tmp_path / "w.toml"
    path.write_text(content)
    with pytest.raises(BadArgumentError) as info:
        load_workload_spec(path)
    for w in words:
        assert w in str(info.value)


def test_unknown_workload():
    with pytest.raises(BadArgumentError, match="known: swe-bench, bfcl"):
        get_workload("swebench")


def test_tracelab_import():
    programs = load_trace(DATA / "tracelab_sample.jsonl", jps=0.5, seed=1)
    assert sorted(len(p.turns) for p in programs) == [3, 4, 5, 6]
    rows = [json.loads(line) for line in (DATA / "tracelab_sample.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["session_id"] == "sess-0"]
    p0 = next(p for p in programs if len(p.turns) == len(first))
    for turn, row in zip(p0.turns, first):
        assert turn.prompt_tokens == row["input_tokens_total"] and turn.output_tokens == row["output_tokens"]
        if row["tools"]:
            t = row["tools"][0]
            expect = t["tool_internal_latency_ms"] if t["tool_internal_latency_ms"] is not None else t["tool_wall_latency_ms"]
            assert turn.tool_duration_s == pytest.approx(expect / 1000) and turn.tool == t["tool_name"]
    assert p0.turns[-1].tool is None
    with pytest.raises(BadArgumentError, match="pass a load"):
        load_trace(DATA / "tracelab_sample.jsonl")


def test_mooncake_import_uses_its_timestamps():
    programs = load_trace(DATA / "mooncake_sample.jsonl")
    assert [p.arrival_s for p in programs] == [0.0, 1.5, 3.0, 4.5]
    assert [len(p.turns) for p in programs] == [2, 3, 4, 5]
    assert programs[0].turns[0].tool_duration_s > 0 and programs[0].turns[-1].tool is None
    assert load_trace(DATA / "mooncake_sample.jsonl", max_programs=2, jps=1.0)[1].arrival_s > 0


@pytest.mark.parametrize("lines, words", [
    (["not json"], ["not JSON"]),
    (['{"foo": 1}'], ["neither a TraceLab round nor a Mooncake row"]),
    (['{"input_length": -5, "output_length": 3}'], ["'input_length' must be a finite number >= 0"]),
    (['{"input_length": 5}'], ["missing 'output_length'"]),
    (['{"input_length": 5, "output_length": 3}', '{"newly_append_tokens": 5, "output_tokens": 3}'], ["mixes"]),
    (['[1, 2]'], ["JSON object"]),
    ([], ["no rows"]),
])
def test_bad_traces(tmp_path, lines, words):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(BadArgumentError) as info:
        load_trace(path, jps=1.0)
    for w in words:
        assert w in str(info.value)


# ---- the engine ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["vllm", "vllm-lmcache", "autellix", "infercept", "continuum-preview",
                                    "continuum", "kvttl", "oracle", "fixed:3s"])
def test_every_policy_completes_every_turn_without_leaks(policy):
    programs = generate(get_workload("swe-bench"), 12, 0.3, seed=2)
    sim, result = run(programs, policy, host_gb=64.0, blocks=7000)  # tight: preemptions and revocations happen
    assert len(result.jct_s) == 12 and np.all(result.jct_s > 0)
    # a program cannot finish before its tools have run
    for p, jct in zip(programs, result.jct_s):
        assert jct >= sum(t.tool_duration_s for t in p.turns)
    assert sim.pool.num_referenced == 0 and sim.pool.num_pinned == 0 and sim.kit.num_leases == 0
    sim.pool.check_invariants()
    summary = result.summary()
    assert 0 <= summary["prefix_hit_rate"] <= 1
    assert summary["output_tokens_per_s"] > 0
    # every output token is generated exactly once: a preempted request
    # recomputes its KV, not its tokens
    assert result.output_tokens == sum(t.output_tokens for p in programs for t in p.turns)


@pytest.mark.parametrize("order", ["request-fcfs", "plas"])
def test_pins_never_stall_the_engine_whatever_the_queue_order(order):
    """A bundle whose queue order does not put pinned programs first, with
    "later-programs" revocation: a lease held while its next turn waits
    behind a request that may not revoke it once stalled the engine (found
    replaying swe-bench at 0.2 jps). A step with nothing to run gives a lease back."""
    import attrs

    from kvttl.policy import QUEUE_ORDERS

    programs = generate(get_workload("swe-bench"), 60, 0.2, seed=0)
    cost = H100
    policy = attrs.evolve(get_policy("kvttl"), queue_order=QUEUE_ORDERS[order])
    assert policy.revokes == "later-programs" and policy.hold_while_waiting
    sim = Simulator(programs, policy, cost, EngineConfig(), jps=0.2)
    result = sim.run()
    assert len(result.jct_s) == 60 and result.leases_revoked > 0
    assert sim.pool.num_referenced == 0 and sim.kit.num_leases == 0


def test_tight_pools_exercise_preemption_and_revocation():
    programs = generate(get_workload("swe-bench"), 12, 0.3, seed=2)
    _, result = run(programs, "continuum", host_gb=0.0, blocks=7000)
    assert result.preemptions > 0 and result.leases_revoked > 0
    assert result.output_tokens == sum(t.output_tokens for p in programs for t in p.turns)


def test_simulation_is_deterministic():
    programs = generate(get_workload("bfcl"), 15, 2.0, seed=5)
    a = run(programs, "continuum")[1].summary()
    b = run(programs, "continuum")[1].summary()
    assert a == b


def test_kvttl_is_continuum_without_a_host_tier_hints_aging_its_queue_order_or_revocation_price():
    import attrs

    from kvttl.policy import program_fcfs

    programs = generate(get_workload("swe-bench"), 15, 0.3, seed=1)
    a = run(programs, "continuum", host_gb=0.0)[1].summary()
    facts = dict(capacity_blocks=H100.num_gpu_blocks(16), reload=H100.reload_model(8192))
    kvttl = attrs.evolve(get_policy("kvttl", **facts), max_queue_jump_prefills=None, queue_order=program_fcfs)
    kvttl.ttl.revocation_min_samples = 10**9  # never prices a pin by its chance of revocation
    kvttl.ttl.estimator.prior_weight = None  # and takes Continuum's staged estimate of the tools
    b = Simulator(programs, kvttl, H100, EngineConfig(host_tier_gb=0.0), jps=0.2).run().summary()
    a.pop("policy"), b.pop("policy")
    assert a == b


def test_the_oracle_bounds_the_table_and_never_lets_a_pin_expire(capsys):
    """Issue #13 item 1: a clairvoyant policy in every table and the JSON;
    it pins only turns that return, so none of its leases expires, and it is
    never named the best policy."""
    programs = generate(get_workload("swe-bench"), 12, 0.3, seed=2)
    sim, result = run(programs, "oracle", host_gb=64.0, blocks=7000)
    assert result.leases_granted > 0 and result.leases_expired == 0
    assert sim.pool.num_referenced == 0 and sim.kit.num_leases == 0
    assert main(["simulate", "--programs", "12", "--jps", "0.3", "--policies", "vllm,kvttl,oracle",
                 "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best at 0.3 jps: oracle" not in out and "oracle (a clairvoyant bound on TTLs, not a choice): mean JCT" in out


def pressure_scenario():
    """C keeps the engine busy; A pins its context over a 5 s tool call; B,
    a newer program, needs more than the free blocks meanwhile.

        pool: 300 blocks. C <= 60, A's context 102 blocks, B's prompt 213: with
        A pinned B does not fit until A is back; without, B evicts A.
    """
    c = Program(program_id=0, arrival_s=0.0, turns=(Turn(prompt_tokens=160, output_tokens=800),))
    a = Program(program_id=1, arrival_s=0.1, turns=(
        Turn(prompt_tokens=1600, output_tokens=32, tool="bash", tool_duration_s=5.0),
        Turn(prompt_tokens=1700, output_tokens=16)))
    b = Program(program_id=2, arrival_s=1.0, turns=(Turn(prompt_tokens=3400, output_tokens=16),))
    return [c, a, b]


def test_a_pin_keeps_the_context_that_a_stock_engine_evicts():
    _, stock = run(pressure_scenario(), "vllm", blocks=300)
    _, pinned = run(pressure_scenario(), "fixed:30s", blocks=300)
    assert stock.reprefilled_tokens > 0, "the scenario must evict A's context without pins"
    assert pinned.reprefilled_tokens == 0 and pinned.leases_hit == 1 and pinned.leases_granted == 1
    assert pinned.jct_s[1] < stock.jct_s[1]


def test_an_expired_pin_frees_its_blocks():
    programs = pressure_scenario()
    programs[1] = Program(program_id=1, arrival_s=0.1, turns=(
        Turn(prompt_tokens=1600, output_tokens=32, tool="bash", tool_duration_s=60.0),
        Turn(prompt_tokens=1700, output_tokens=16)))
    sim, result = run(programs, "fixed:2s", blocks=300)
    assert result.leases_expired == 1 and result.leases_hit == 0
    assert result.jct_s[2] < 30  # B did not wait for A's minute-long tool


def test_a_turn_too_big_for_the_engine_is_refused_up_front():
    big = [Program(program_id=0, arrival_s=0.0, turns=(Turn(prompt_tokens=10_000, output_tokens=10),))]
    with pytest.raises(BadArgumentError, match="needs 626 blocks; the engine has 100"):
        run(big, "vllm", blocks=100)


def test_gain_grows_with_turns_on_the_default_workload():
    """The paper's Fig. 13 shape: continuum's advantage over vllm is larger
    for programs with more turns (here at a saturating load)."""
    programs = generate(get_workload("swe-bench"), 40, 0.3, seed=0)
    _, base = run(programs, "vllm", jps=0.3)
    _, cont = run(programs, "continuum", jps=0.3)
    turns = base.turns
    few, many = turns <= np.median(turns), turns > np.median(turns)
    gain = lambda mask: base.jct_s[mask].mean() / cont.jct_s[mask].mean()  # noqa: E731
    assert cont.jct_s.mean() < base.jct_s.mean()
    assert gain(many) > gain(few)


# ---- the CLI --------------------------------------------------------------------------------------

def test_simulate_cli_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["simulate", "--programs", "6", "--jps", "0.2,0.4", "--policies", "vllm,continuum,kvttl",
               "--json", str(out), "--plot", str(png), "--quiet", "--workers", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "at 0.4 jps every policy is within 1%" in text and "by turns per program" in text  # 6 programs tie
    report = json.loads(out.read_text())
    assert len(report["results"]) == 6
    for r in report["results"]:
        for key in ("policy", "jps", "mean_jct_s", "p50_jct_s", "p95_jct_s", "throughput_jobs_per_s",
                    "prefix_hit_rate", "leases_granted", "preemptions", "mean_queue_delay_s", "jct_s"):
            assert key in r
        assert len(r["jct_s"]) == 6
    assert report["config"]["loads"] == [0.2, 0.4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_on_a_trace(tmp_path, capsys):
    rc = main(["simulate", "--trace", str(DATA / "mooncake_sample.jsonl"), "--jps", "1", "--policies",
               "vllm,continuum", "--quiet", "--workers", "1"])
    assert rc == 0 and "mooncake_sample.jsonl" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--policies", "vllm,nope"], ["unknown policy 'nope'"]),
    (["--jps", "fast"], ["--jps", "comma-separated numbers"]),
    (["--jps", "-1"], ["positive"]),
    (["--preset", "tpu"], ["unknown preset"]),
    (["--workload", "chat"], ["unknown workload"]),
    (["--programs", "0"], ["programs must be between 1"]),
    (["--host-gb", "-2"], [">= 0 GB"]),
    # issue #12: each of these was a traceback, or found only after the sweep
    (["--host-gb", "nan"], ["host tier", "nan"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--policies", "vllm,vllm"], ["vllm given more than once"]),
    (["--gpu-blocks", "0"], ["gpu blocks must be >= 1", "got 0"]),
    (["--gpu-blocks", "-5"], ["gpu blocks must be >= 1", "got -5"]),
    (["--json", "/nonexistent-dir/r.json"], ["--json", "does not exist"]),
    (["--plot", "/nonexistent-dir/r.png"], ["--plot", "does not exist"]),
    # a new user's review (2026-12-06): tracebacks, silent defaults, messages that named the wrong thing
    (["--jps", "0.4,0.4"], ["0.4", "more than once"]),
    (["--jps", "0.1,0.10"], ["0.1", "more than once"]),
    (["--jps", ""], ["--jps", "at least one"]),
    (["--policies", ""], ["no policies"]),
    (["--trace", "/tmp"], ["trace /tmp", "directory"]),
    (["--preset", "/nonexistent-dir/p.json"], ["preset file", "does not exist"]),
    (["--policies", "vllm,fixed:abc"], ["policy 'fixed:abc'"]),
    (["--workload", "bfcl", "--trace", "t.jsonl"], ["--workload or --trace, not both"]),
    (["--router", "round-robin"], ["--replicas 2 or more"]),
])
def test_simulate_cli_errors(capsys, args, words):
    assert main(["simulate", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvttl simulate: error: "), err
    for w in words:
        assert w in err


_BAD_FILES = {
    "shape.json": (b'{"turns_shape": 0}', "turns_shape must be > 0"),
    "weights.json": (b'{"tools": [{"name": "a", "weight": 0, "median_s": 1, "sigma": 0.5}]}', "every tool has weight 0"),
    "array.json": (b"[1, 2]", "expected an object of fields"),
    "tools.json": (b'{"tools": [3]}', "tools must be a list of tables"),
    "nan.json": (b'{"mean_turns": NaN}', "mean_turns must be a finite number"),
    "runaway.json": (b'{"tools": [{"name": "slow", "weight": 1, "median_s": 80000, "sigma": 5}]}',
                     "ran past 1e+07 simulated seconds"),
    "nan.jsonl": (b'{"session_id": "s", "input_length": NaN, "output_length": 5}\n', "'input_length' must be a finite"),
    "text.jsonl": (b'{"session_id": "s", "input_length": "12", "output_length": 5}\n', "got '12'"),
    "digits.jsonl": (b'{"session_id": "s", "input_length": 1' + b"0" * 400 + b', "output_length": 5}\n',
                     "got 1000000000"),
    "tool.jsonl": (b'{"session_id": "s", "input_length": 9, "output_length": 5, "tool": {"a": 1}}\n',
                   "a tool name must be a string"),
    "latin1.jsonl": (b'\xff{"session_id": "s"}\n', "not UTF-8"),
    "tools.jsonl": (b'{"session_id": "s", "newly_append_tokens": 9, "output_tokens": 5, "tools": [7]}\n',
                    "each of 'tools' must be an object"),
    # preset files (--preset): were IsADirectoryError, AttributeError, ZeroDivisionError, TypeError
    "preset-number.json": (b"42", "expected an object"),
    "preset-mfu0.json": (b'{"model": "llama-3.1-8b-h100", "gpu": "llama-3.1-8b-h100", "mfu": 0}', "mfu must be"),
    "preset-mfu-text.json": (b'{"model": "llama-3.1-8b-h100", "gpu": "llama-3.1-8b-h100", "mfu": "high"}',
                             "mfu must be"),
    "preset-mfu-neg.json": (b'{"model": "llama-3.1-8b-h100", "gpu": "llama-3.1-8b-h100", "mfu": -0.4}', "mfu must be"),
    "preset-tp.json": (b'{"model": "llama-3.1-8b-h100", "gpu": "llama-3.1-8b-h100", "tp": 1.5}', "tp must be"),
    "preset-mem.json": (b'{"model": "llama-3.1-8b-h100", "gpu": "llama-3.1-8b-h100", "memory_utilization": 3}',
                        "memory_utilization must be"),
    "preset-typo.json": (b'{"model": "llama-3.1-8b", "gpu": "llama-3.1-8b-h100"}',
                         "model 'llama-3.1-8b' is not a preset"),
    "preset-nomodel.json": (b'{"gpu": "llama-3.1-8b-h100"}', "needs 'model'"),
}


@pytest.mark.parametrize("name", sorted(_BAD_FILES))
def test_simulate_cli_bad_files_give_one_error_line(tmp_path, capsys, name):
    content, words = _BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    flag = "--trace" if name.endswith(".jsonl") else "--preset" if name.startswith("preset") else "--workload"
    extra = ["--programs", "4", "--jps", "0.1", "--policies", "vllm"] if name == "runaway.json" else []
    assert main(["simulate", "--quiet", "--workers", "1", flag, str(path), "--jps", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvttl simulate: error: ") and words in err, err


def test_simulate_cli_plot_without_matplotlib_fails_before_the_sweep(capsys, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    import kvttl.sim.runner as runner

    monkeypatch.setattr(runner, "_run_one", lambda task: pytest.fail("a run started before the check"))
    assert main(["simulate", "--quiet", "--plot", str(tmp_path / "r.png")]) == 2
    assert "pip install 'kvttl[plot]'" in capsys.readouterr().err


def test_simulate_cli_prints_a_line_per_run_when_piped(capsys):
    assert main(["simulate", "--programs", "3", "--jps", "0.2", "--policies", "vllm,continuum", "--workers", "1"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and lines[0].startswith("[1/2] vllm at 0.2 jps: mean JCT ") and lines[1].startswith("[2/2]")


# ---- workload and trace fidelity (issue #13, item 4) -------------------------------------------

def test_aiperf_rows_wait_before_and_count_new_tokens(tmp_path):
    """A Dynamo/aiperf multi-turn row's delay is the wait before it, and its
    input_length the turn's new tokens: both were misread (every tool gap a
    turn late, most turns looking like compactions)."""
    from kvttl.sim import load_trace

    path = tmp_path / "aiperf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"session_id": "s", "input_length": 1000, "output_length": 50, "timestamp": 0},
        {"session_id": "s", "input_length": 200, "output_length": 40, "delay": 3000},
        {"session_id": "s", "input_length": 300, "output_length": 30, "delay": 500}]))
    turns = load_trace(path, jps=1.0)[0].turns
    assert [t.prompt_tokens for t in turns] == [1000, 1250, 1590]
    assert [t.tool_duration_s for t in turns] == [3.0, 0.5, 0.0]
    # the agentic form (tool_wait_ms after the row, whole prompts) reads as before
    sample = load_trace(DATA / "mooncake_sample.jsonl", jps=1.0)[0].turns
    assert [t.prompt_tokens for t in sample] == [2000, 3034] and sample[0].tool_duration_s == 1.2


def _trace(tmp_path, rows):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_mooncake_hash_ids_say_what_a_context_shares(tmp_path):
    """Issue #13 item 4: Mooncake hash_ids (rolling ids of 512-token blocks)
    were ignored, so two sessions with one system prompt shared nothing and a
    turn that rewrote its history still hit all of it. Turns that continue
    each other take the ids of the last of them (a turn's own output is named
    only by later rows); ids that disagree on a full block start a new context."""
    rows = [
        {"session_id": "s", "input_length": 1100, "output_length": 50, "hash_ids": [1, 2, 3], "timestamp": 0,
         "tool_wait_ms": 100},
        {"session_id": "s", "input_length": 1200, "output_length": 50, "hash_ids": [1, 2, 7], "tool_wait_ms": 100},
        {"session_id": "s", "input_length": 1300, "output_length": 50, "hash_ids": [1, 9, 10]},
        {"session_id": "t", "input_length": 1024, "output_length": 8, "hash_ids": [1, 20], "timestamp": 10},
    ]
    s, t = load_trace(_trace(tmp_path, rows))
    assert s.hash_block_tokens == t.hash_block_tokens == 512
    assert [(x.hash_ids, x.hash_extent_tokens, x.new_context) for x in s.turns] == [
        ((1, 2, 7), 1200, False), ((1, 2, 7), 1200, False), ((1, 9, 10), 1300, True)]
    assert t.turns[0].hash_ids == (1, 20)
    aiperf = load_trace(_trace(tmp_path, [
        {"session_id": "a", "input_length": 1024, "output_length": 8, "hash_ids": [1, 2], "timestamp": 0},
        {"session_id": "a", "input_length": 100, "output_length": 8, "hash_ids": [55], "delay": 500}]))[0]
    # aiperf rows name their new tokens only: the first row's ids lead every turn's context
    assert [(x.hash_ids, x.hash_extent_tokens) for x in aiperf.turns] == [((1, 2), 1024)] * 2
    with pytest.raises(BadArgumentError, match="hash_ids"):
        load_trace(_trace(tmp_path, [{"input_length": 5, "output_length": 1, "hash_ids": [1, "x"]}]), jps=1.0)


def test_the_simulators_prefix_cache_follows_mooncake_hash_ids(tmp_path):
    rows = [
        {"session_id": "a", "input_length": 2048, "output_length": 8, "hash_ids": [1, 2, 3, 4], "timestamp": 0},
        {"session_id": "b", "input_length": 2048, "output_length": 8, "hash_ids": [1, 2, 30, 31], "timestamp": 5000},
    ]
    sim, result = run(load_trace(_trace(tmp_path, rows)), "vllm", jps=1.0)
    assert result.cached_tokens == 1024  # b's first two blocks are a's: a system prompt two sessions share
    rows = [
        {"session_id": "c", "input_length": 2000, "output_length": 100, "hash_ids": [5, 6, 7, 8], "timestamp": 0,
         "tool_wait_ms": 1000},
        {"session_id": "c", "input_length": 2200, "output_length": 8, "hash_ids": [5, 66, 67, 68, 69]},
    ]
    sim, result = run(load_trace(_trace(tmp_path, rows)), "vllm", jps=1.0)
    assert result.cached_tokens == 512  # the second turn rewrote all but the first block of its history
    rows[1]["hash_ids"] = [5, 6, 7, 80, 81]
    sim, result = run(load_trace(_trace(tmp_path, rows)), "vllm", jps=1.0)
    assert result.cached_tokens == 2096  # it continues: the whole previous context but the block of its last token


def test_a_spec_file_sweeps_its_bases_loads(tmp_path):
    from kvttl.sim.runner import DEFAULT_JPS, SweepConfig

    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"base": "bfcl", "mean_turns": 5}))
    assert SweepConfig(workload=str(spec)).loads() == DEFAULT_JPS["bfcl"]
    spec.write_text(json.dumps({"mean_turns": 5}))
    assert SweepConfig(workload=str(spec)).loads() == DEFAULT_JPS["swe-bench"]


def test_the_by_turns_table_keeps_long_programs_and_the_header_counts_what_ran(tmp_path, capsys):
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps({"mean_turns": 60, "max_turns": 80, "turns_shape": 50}))
    out = tmp_path / "r.json"
    assert main(["simulate", "--quiet", "--workers", "1", "--workload", str(spec), "--programs", "4",
                 "--jps", "0.05", "--policies", "vllm,continuum", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert sum(b["num_programs"] for b in report["by_turns"] if b["policy"] == "vllm") == 4
    assert any(b["turns"] == "16+" for b in report["by_turns"]) and "16+ turns" in text
    assert main(["simulate", "--quiet", "--workers", "1", "--trace", str(DATA / "mooncake_sample.jsonl"),
                 "--jps", "1", "--programs", "60", "--policies", "vllm"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    sessions = len({json.loads(line)["session_id"] for line in (DATA / "mooncake_sample.jsonl").read_text().splitlines()
                    if line.strip()})
    assert f", {sessions} programs," in header


def test_a_tie_is_called_a_tie(capsys):
    """BFCL at its defaults: every policy ties, and the output named a 'best' one out of the tie."""
    assert main(["simulate", "--quiet", "--workers", "1", "--workload", "bfcl", "--jps", "0.5",
                 "--programs", "10", "--policies", "vllm,continuum"]) == 0
    text = capsys.readouterr().out
    assert "a tie" in text and "best at 0.5 jps: continuum" not in text


def test_a_full_host_tier_is_named_with_the_flag_that_sizes_it(tmp_path, capsys):
    """On 70B/4xH100 the 256 GB default held the contexts of only about a fifth of
    60 programs: the peers that lean on the host tier re-prefilled, and the ranking
    hung on the tier's size without the output saying so."""
    out = tmp_path / "r.json"
    args = ["simulate", "--quiet", "--workers", "1", "--programs", "6", "--jps", "0.4", "--gpu-blocks", "6000",
            "--policies", "vllm,vllm-lmcache", "--json", str(out)]
    assert main(args + ["--host-gb", "0.5"]) == 0  # a few thousand tokens: no context fits
    text = capsys.readouterr().out
    rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["vllm-lmcache"]["host_lost_rate"] > 0 and rows["vllm"]["host_lost_tokens"] == 0
    assert "The 0.5 GB host tier was too small for vllm-lmcache: it could not keep contexts" in text
    assert "--host-gb sets it" in text
    assert main(args) == 0  # the default holds six programs' contexts
    assert "too small" not in capsys.readouterr().out
    rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["vllm-lmcache"]["host_lost_tokens"] == 0 and rows["vllm-lmcache"]["host_reload_rate"] > 0


def test_a_trace_with_arrival_times_replays_them_without_jps(tmp_path, capsys):
    """--trace never used Mooncake timestamps from the CLI: a load was always supplied."""
    out = tmp_path / "r.json"
    assert main(["simulate", "--quiet", "--workers", "1", "--trace", str(DATA / "mooncake_sample.jsonl"),
                 "--policies", "vllm,continuum", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["loads"] == [0.0] and len(report["results"]) == 2
    assert "trace times" in capsys.readouterr().out
    # TraceLab rounds carry no usable arrival times: the default loads, as before
    assert main(["simulate", "--quiet", "--workers", "1", "--trace", str(DATA / "tracelab_sample.jsonl"),
                 "--policies", "vllm", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["config"]["loads"]) == 4


def test_trace_times_are_rebased_and_judged_on_the_sessions_that_run(tmp_path):
    """From review: epoch-ms timestamps ran past the simulator's horizon, and
    a session past --programs without a timestamp switched the replay to Poisson loads."""
    from kvttl.sim import load_trace
    from kvttl.sim.runner import TRACE_TIMES, SweepConfig

    path = tmp_path / "epoch.jsonl"
    rows = [{"session_id": "a", "input_length": 500, "output_length": 20, "timestamp": 1.7e12},
            {"session_id": "b", "input_length": 500, "output_length": 20, "timestamp": 1.7e12 + 2000},
            {"session_id": "c", "input_length": 500, "output_length": 20}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [p.arrival_s for p in load_trace(path, max_programs=2)] == [0.0, 2.0]
    assert SweepConfig(trace=str(path), num_programs=2).loads() == (TRACE_TIMES,)
    with pytest.raises(BadArgumentError, match="1 of 3 sessions have no timestamp"):  # was: Poisson, silently
        SweepConfig(trace=str(path), num_programs=3).loads()


def test_the_readmes_simulator_table_is_what_the_code_produces(tmp_path):
    """Issue #13 item 7: the README's numbers come from a script, never typed
    (they had gone stale: continuum 308.1 s documented, 303.0 s produced).
    On a mismatch: ``python scripts/readme_tables.py OUT.json --write README.md``."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("readme_tables", root / "scripts" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    out = tmp_path / "sim.json"
    assert main([*tables.COMMAND, "--json", str(out)]) == 0
    produced = tables.table(json.loads(out.read_text()))
    assert tables.current_block((root / "README.md").read_text()) == produced, \
        f"README.md's table is stale; regenerate it with scripts/readme_tables.py (produced:\n{produced})"


def test_the_gittins_order_beats_program_fcfs_on_mixed_program_lengths():
    """Issue #13: on short and long programs mixed, program FCFS serves the
    old, long programs first (kvttl 289.3 s against vllm-lmcache's 261.0 s at
    0.4 jps). The Gittins order moves a turn only as far as its program is
    a better bet than a new one, nearly not at all with lengths this close to
    memoryless: measured 268.2 s, and 49.1 s against 78.5 s for the 1-5-turn
    programs. vllm-lmcache stays ahead here (261.0 s; 43.9 s for the short
    ones)."""
    import attrs

    from kvttl.policy import program_fcfs

    spec = attrs.evolve(get_workload("swe-bench"), turns_shape=1.2)  # benchmarks/workloads/mixed-lengths.toml
    programs = generate(spec, 60, 0.4, seed=0)
    facts = dict(capacity_blocks=H100.num_gpu_blocks(16), reload=H100.reload_model(8192))
    config = EngineConfig(host_tier_gb=256.0)
    gittins = Simulator(programs, get_policy("kvttl", **facts), H100, config, jps=0.4).run()
    fcfs_bundle = attrs.evolve(get_policy("kvttl", **facts), queue_order=program_fcfs)
    fcfs = Simulator(programs, fcfs_bundle, H100, config, jps=0.4).run()
    short = np.array([len(p.turns) <= 5 for p in programs])
    assert short.sum() >= 10
    assert np.mean(gittins.jct_s) < 0.985 * np.mean(fcfs.jct_s)
    assert np.mean(gittins.jct_s[short]) < 0.85 * np.mean(fcfs.jct_s[short])


def test_simulate_cli_a_preset_that_is_a_directory_is_one_error_line(tmp_path, capsys):
    folder = tmp_path / "dir.json"
    folder.mkdir()
    assert main(["simulate", "--quiet", "--preset", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "directory" in err, err


def _table(capsys, *args):
    assert main(["simulate", "--quiet", "--workers", "1", "--programs", "6", "--jps", "0.4", *args]) == 0
    return capsys.readouterr().out


def test_the_summary_never_calls_a_lone_policy_beside_the_oracle_a_tie(capsys):
    # was: "every policy is within 1% of the others: a tie" with vllm at 1.49x the oracle's JCT
    out = _table(capsys, "--policies", "vllm,oracle")
    assert "a tie" not in out and "within 1%" not in out and "oracle (a clairvoyant bound" in out
    out = _table(capsys, "--policies", "kvttl")
    assert "a tie" not in out and "within 1%" not in out and "best at" not in out


def test_the_table_keeps_its_columns_under_a_long_baseline_name(capsys):
    # was: "vs continuum-preview" over a 10-character column shifted every column after it
    out = _table(capsys, "--policies", "continuum-preview,kvttl")
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("jps"))
    row = next(line for line in lines if " kvttl " in line and "x " in line)
    assert header.index("jobs/s") + len("jobs/s") == row.index(row.split()[6]) + len(row.split()[6])


def test_a_trace_replay_reports_and_plots_the_programs_it_ran(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    # was: "60 programs" in the JSON and the plot's title for a 4-session trace, and a load axis at 0 jobs/s
    out = tmp_path / "r.json"
    assert main(["simulate", "--quiet", "--workers", "1", "--trace", str(DATA / "mooncake_sample.jsonl"),
                 "--policies", "vllm,kvttl", "--json", str(out), "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["programs_run"] == report["results"][0]["num_programs"] < 60
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_a_trace_with_some_arrival_times_says_so(tmp_path, capsys):
    # was: it fell back to Poisson arrivals at the swe-bench loads without a word
    trace = tmp_path / "partial.jsonl"
    trace.write_text('{"session_id": "a", "timestamp": 1000, "input_length": 900, "output_length": 20}\n'
                     '{"session_id": "b", "input_length": 800, "output_length": 20}\n')
    assert main(["simulate", "--quiet", "--workers", "1", "--trace", str(trace), "--policies", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 sessions have no timestamp" in err, err
    assert main(["simulate", "--quiet", "--workers", "1", "--trace", str(trace), "--policies", "vllm",
                 "--jps", "0.5"]) == 0
