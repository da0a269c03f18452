"""Issue #17 on SGLang: the adapter measures its engine's prefill rate from the
engine's own steps, and a returning turn's delay runs to its first token, as
the vLLM adapter does. Before, SGLang's kit kept the configured 10k tokens/s
prior forever and heard of a returning turn only at admission."""

from __future__ import annotations

import ast
import importlib.util
import time
import types
from pathlib import Path

import pytest

from tests.adapters.sglang.harness import FakeClock, Turn, make_cache, make_kv_hints, run_turn, tokens


def _batch(reqs, *, extend_tokens=None, launched_at=None, decode=False):
    """A real ScheduleBatch as the scheduler hands it to process_batch_result."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return ScheduleBatch(reqs=list(reqs), forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
                         launch_ts=time.monotonic() if launched_at is None else launched_at,
                         extend_num_tokens=extend_tokens, device="cpu")


#: the rate the timed steps below run at, 10x the configured prior
TRUE_TOKENS_PER_S = 100_000.0
STEP_S = 0.01


def _timed_steps(cache, sizes, extra_s=0.0):
    for n in sizes:
        batch = _batch([], extend_tokens=n)
        time.sleep(STEP_S + n / TRUE_TOKENS_PER_S + extra_s)
        cache.on_batch_result(batch)


def test_prefill_steps_teach_the_kit_this_engines_rate():
    cache = make_cache(tokens=128)
    assert cache.kit.prefill_tokens_per_s == pytest.approx(10_000.0)  # the prior
    decode = _batch([], decode=True)
    time.sleep(0.05)
    cache.on_batch_result(decode)  # decode steps are not timed
    assert cache.kit.step_costs.num_steps == 0
    _timed_steps(cache, (1000, 6000, 2000, 5000, 3000, 4000) * 2)
    assert cache.kit.step_costs.num_steps == 12
    # sleeps overshoot by a little and a loaded machine stretches them: far from the prior is what counts
    assert 50_000 < cache.kit.prefill_tokens_per_s < 200_000


def test_a_step_launched_before_the_previous_result_counts_from_that_result():
    """Overlap scheduling launches the next batch before this one's result is
    read: its time runs from the later of the two."""
    cache = make_cache(tokens=128)
    early = _batch([], extend_tokens=2000, launched_at=time.monotonic() - 10.0)
    cache.on_batch_result(_batch([], decode=True))  # a result seen after `early` was launched
    time.sleep(0.02)
    cache.on_batch_result(early)
    step_s, _ = cache.kit.step_costs.line()
    assert cache.kit.step_costs.num_steps == 1
    assert step_s < 1.0  # not the 10 s since its launch


def test_a_returning_turn_reports_its_delay_at_its_first_token():
    """Its admission is first seen in the hook, after SGLang's chunk checkpoint
    moved ``req.prefix_len`` to the whole prompt: the device match from before
    the lock still says the context was lost."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    clock = FakeClock()
    cache = make_cache(tokens=256, clock=clock, config={"measure_costs": False, "reload_tokens_per_s": 1000.0})
    policy = cache.kit.policy.ttl
    cache.on_batch_result(_batch([], extend_tokens=0))  # the engine reports prefills: first tokens will be timed
    first = run_turn(cache, tokens(1, 40), 8, program_id="A", ttl="0s")
    cache.evict(EvictParams(num_tokens=cache.evictable_size()))  # A's unpinned context is gone
    back = Turn(cache, first.context + tokens(99, 10), 8, hints=make_kv_hints("A")).arrive()
    arrived, prompt = clock.t, len(back.req.origin_input_ids)
    clock.t += 1.0
    back.admit()  # the pool has room: nothing evicts, so no hook has seen the lock yet
    assert back.req.rid in cache._waiting and back.prefix_len == 0
    back.req.prefix_len = prompt  # what checkpoint_kv_cache does after a prefill chunk
    cache.on_batch_result(_batch([back.req], extend_tokens=prompt))  # a chunk: no output token yet
    assert back.req.rid in cache.kit.awaiting_first_token and policy.evicted_delay.mean() == 0.0
    clock.t += 2.0
    back.req.output_ids.append(7)
    cache.on_batch_result(_batch([back.req], decode=True))  # decode results are not where first tokens are read
    assert back.req.rid in cache.kit.awaiting_first_token
    cache.on_batch_result(_batch([back.req], extend_tokens=1))
    assert back.req.rid not in cache.kit.awaiting_first_token
    # reported as lost (a kept context adds nothing to T), 3 s less its prefill of the whole prompt
    assert policy.evicted_delay.mean() == pytest.approx(clock.t - arrived - prompt / 1000.0)
    back.finish()
    cache.kit.check_invariants()


def test_decode_viewed_as_extends_is_not_a_prefill():
    """Under DP attention SGLang runs decode requests as 1-token extends when a
    peer rank prefills (convert_decode_to_extend): not a prefill step."""
    cache = make_cache(tokens=128)
    batch = _batch([], extend_tokens=4)
    batch.decoding_reqs = batch.reqs
    time.sleep(0.01)
    cache.on_batch_result(batch)
    assert cache.kit.step_costs.num_steps == 0 and not cache.kit.times_first_tokens


def _scheduler_method_args(name: str) -> list[str]:
    """The parameters of sglang's Scheduler.<name>, read from its source (the
    scheduler module imports server-only packages this venv does not have)."""
    spec = importlib.util.find_spec("sglang.srt.managers.scheduler")
    tree = ast.parse(Path(spec.origin).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return [a.arg for a in fn.args.args]


def test_the_plugin_hooks_process_batch_result():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin

    plugin.register()
    assert any(hook is plugin.after_process_batch_result for _, hook, _ in HookRegistry._hooks[plugin.BATCH_RESULT])
    # the hook reads the batch as SGLang passes it: process_batch_result(self, batch, result)
    assert plugin.BATCH_RESULT.rsplit(".", 1)[1] == "process_batch_result"
    assert _scheduler_method_args("process_batch_result")[:3] == ["self", "batch", "result"]
    cache = make_cache(tokens=128)
    scheduler = types.SimpleNamespace(tree_cache=cache)  # the hook reads only the scheduler's tree cache
    batch = _batch([], extend_tokens=500)
    time.sleep(0.01)
    assert plugin.after_process_batch_result("result", scheduler, batch, None) == "result"
    assert cache.kit.step_costs.num_steps == 1


def _tp_rank(rank, world, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cache = make_cache(tokens=128, tp_group=dist.group.WORLD)
    _timed_steps(cache, (1000, 4000))  # no turn in flight: not timed under tensor parallelism
    steps_idle = cache.kit.step_costs.num_steps
    Turn(cache, tokens(1, 20), 4, hints=make_kv_hints("A")).arrive()
    _timed_steps(cache, (1000, 4000, 2000, 3000), extra_s=0.02 * rank)  # rank 1 runs slower
    results[rank] = (steps_idle, cache.kit.step_costs.num_steps, cache.kit.prefill_tokens_per_s)
    dist.destroy_process_group()


def test_tp_ranks_learn_the_same_rate_from_different_step_times():
    """The learned rate feeds the TTL rule, which must decide alike on every
    rank: each step's time is the slowest rank's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # a forked manager can inherit a held lock and hang
    mp.spawn(_tp_rank, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == results[1], (results[0], results[1])
    assert results[0][:2] == (0, 4)
