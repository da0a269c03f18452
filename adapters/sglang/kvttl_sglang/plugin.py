"""SGLang plug-in: the ``kvttl`` radix-cache backend and program-level FCFS.

SGLang calls :func:`register` in every process it starts (it is the
``sglang.srt.plugins`` entry point of the kvttl distribution), so
``--radix-cache-backend kvttl`` works with no import in user code.

Scheduling uses SGLang's hook registry: after ``SchedulePolicy.calc_priority``
sorts the waiting queue, and only when the tree cache is kvttl's and the
policy is ``fcfs`` (SGLang's default), the queue is re-sorted at program
level (pinned programs first, then by the program's first arrival) and, if its
head cannot fit, leases of later programs are revoked. A second hook marks
the lease report (``customized_info["kvttl"]``, set when a turn finishes) as
one value per request, so it reaches the client as ``meta_info["kvttl"]``.
A third, after ``Scheduler.on_idle``, expires leases on an idle server. A
fourth, after ``Scheduler.process_batch_result``, times prefill steps and reports
returning turns' first tokens (``KvttlRadixCache.on_batch_result``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("kvttl.sglang")

BACKEND_NAME = "kvttl"
CALC_PRIORITY = "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority"
ON_IDLE = "sglang.srt.managers.scheduler.Scheduler.on_idle"
BATCH_RESULT = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"
REQUEST_LEVEL_KEY = ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
                     "is_request_level_customized_info_key")

_registered = False


def create_cache(ctx):
    """The registry factory: SGLang's own construction path (HiCache and the
    rest included) with kvttl's subclass in place of UnifiedRadixCache."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    from kvttl_sglang.cache import KvttlRadixCache

    return create_unified_radix_cache(ctx, cache_class=KvttlRadixCache)


def after_calc_priority(result, policy, waiting_queue, running_batch=None, processed_tokens=0):
    """AFTER hook of SchedulePolicy.calc_priority (see the module docstring)."""
    from sglang.srt.managers.schedule_policy import CacheAgnosticPolicy

    from kvttl_sglang.cache import KvttlRadixCache

    cache = policy.tree_cache
    if not isinstance(cache, KvttlRadixCache) or not waiting_queue:
        return result
    if cache.kit.orders_queue and policy.policy == CacheAgnosticPolicy.FCFS:
        waiting_queue.sort(key=cache.queue_key)
    cache.relieve_pressure(waiting_queue, running_batch)
    return result


def after_is_request_level_key(result, streamer, key):
    """AFTER hook: the lease report (``customized_info["kvttl"]``) is one value
    per request, sent once it finishes, not a value per output token."""
    from kvttl_sglang.cache import REPORT_KEY

    return True if key == REPORT_KEY else result


def after_on_idle(result, scheduler, *args, **kwargs):
    """AFTER hook of Scheduler.on_idle: an idle server expires leases on time."""
    from kvttl_sglang.cache import KvttlRadixCache

    cache = getattr(scheduler, "tree_cache", None)
    if isinstance(cache, KvttlRadixCache):
        cache._sleeps_on_idle = getattr(scheduler, "idle_sleeper", None) is not None
        cache.on_idle()
    return result


def after_process_batch_result(result, scheduler, batch, *args, **kwargs):
    """AFTER hook of Scheduler.process_batch_result: the step's cost and first tokens."""
    from kvttl_sglang.cache import KvttlRadixCache

    cache = getattr(scheduler, "tree_cache", None)
    if isinstance(cache, KvttlRadixCache):
        cache.on_batch_result(batch)
    return result


def register() -> None:
    """Entry point: register the backend and the scheduling hook (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, create_cache)
    HookRegistry.register(CALC_PRIORITY, after_calc_priority, HookType.AFTER)
    HookRegistry.register(REQUEST_LEVEL_KEY, after_is_request_level_key, HookType.AFTER)
    HookRegistry.register(ON_IDLE, after_on_idle, HookType.AFTER)
    HookRegistry.register(BATCH_RESULT, after_process_batch_result, HookType.AFTER)
    _registered = True
    logger.info("kvttl: radix cache backend %r registered", BACKEND_NAME)
