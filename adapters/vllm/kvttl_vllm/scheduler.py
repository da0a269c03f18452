"""Program-level FCFS for vLLM's waiting queue, through ``--scheduler-cls``.

    vllm serve MODEL --scheduler-cls kvttl_vllm.scheduler.KvttlScheduler \\
      --kv-transfer-config '{"kv_connector": "KvttlConnector", ...}'

Stock vLLM serves its waiting queue first come, first served *per request*:
an agent's returning turn queues behind every request that arrived while its
tool ran. With kvttl the queue is sorted by the policy's key, computed by the
engine kit (``EngineKit.queue_key``): for Continuum a turn is as old as its
program's first turn, and a turn whose program holds a pin goes first (its
context is already in memory). Requests without a program id are programs
of one turn, so without agents this is exactly vLLM's FCFS.

Only the queue's order changes (and only under ``--scheduling-policy fcfs``,
vLLM's default); admission, preemption and the KV cache stay vLLM's own.
The scheduler also times each step for the kit (``EngineKit.observe_step``),
so that Reload(r) is this engine's prefill cost, not a constant.

``KvttlScheduler`` becomes the scheduler vLLM would have run without it:
vLLM's ``AsyncScheduler`` underneath when async scheduling is on (the
default on GPUs), its ``Scheduler`` otherwise. The class is chosen as the
engine constructs it, from the resolved ``scheduler_config.async_scheduling``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from kvttl_vllm.hints import request_hints

logger = logging.getLogger("kvttl.vllm")

__all__ = ["KvttlScheduler", "KvttlAsyncScheduler", "ProgramFCFSQueue", "kit_of"]


def kit_of(connector):
    """The engine kit of the scheduler's KV connector: kvttl's own, or
    kvttl's inside vLLM's MultiConnector. None without kvttl's connector."""
    kit = getattr(connector, "kit", None)
    if kit is not None:
        return kit
    for inner in getattr(connector, "_connectors", ()) or ():
        kit = getattr(inner, "kit", None)
        if kit is not None:
            return kit
    return None


class ProgramFCFSQueue(RequestQueue):
    """vLLM's RequestQueue ordered by a key per request, smallest first.

    Why a heap of keyed entries: a request's key is fixed when it enters the
    queue (its program's first arrival, and whether the program holds a pin
    right then: a waiting turn's lease does not expire), so a binary heap
    gives O(log n) insertion and pop. Prepended requests (vLLM prepends the
    ones it preempted or skipped) take class -1 and go first, as in vLLM's
    FCFS deque. A sequence number breaks ties, so requests are never compared.
    """

    def __init__(self, key_of: Callable[[Request], tuple]):
        self._heap: list[tuple] = []
        self._key_of = key_of
        self._seq = itertools.count()

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (0, self._key_of(request), next(self._seq), request))

    def prepend_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (-1, (), -next(self._seq), request))

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in reversed(list(requests)):  # the first of them ends up first
            self.prepend_request(request)

    def pop_request(self) -> Request:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[-1]

    def peek_request(self) -> Request:
        if not self._heap:
            raise IndexError("peek at an empty queue")
        return self._heap[0][-1]

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        self._heap = [entry for entry in self._heap if id(entry[-1]) not in gone]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        for entry in sorted(self._heap, key=lambda e: e[:3]):
            yield entry[-1]


class KvttlScheduler(Scheduler):
    """vLLM's scheduler (async or not, as vLLM would choose) with waiting
    queues in the engine kit's order."""

    def __new__(cls, *args, **kwargs):
        if cls is KvttlScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = KvttlAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kvttl_last_output_at = 0.0
        logger.info("kvttl: %s (vLLM's %s with program-level queues)", type(self).__name__,
                    "AsyncScheduler" if isinstance(self, AsyncScheduler) else "Scheduler")
        if self.policy == SchedulingPolicy.FCFS:
            if self.waiting or self.kv_holding_waiting:
                raise RuntimeError("KvttlScheduler: the waiting queues must be empty at start")
            self.waiting = ProgramFCFSQueue(self.program_key)
            self.kv_holding_waiting = ProgramFCFSQueue(self.program_key)

    # ---- what a step costs: the kit learns this engine's prefill rate -----------------
    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        output._kvttl_scheduled_at = time.perf_counter()
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        """Times the step before vLLM digests it: from the later of its
        scheduling and the previous step's output (with async scheduling the
        next step is scheduled while this one runs) to its output. Then tells
        the kit which returning turns have their first token."""
        now = time.perf_counter()
        started = getattr(scheduler_output, "_kvttl_scheduled_at", None)
        tokens = scheduler_output.total_num_scheduled_tokens
        kit = kit_of(self.connector)
        if kit is not None:
            kit.times_first_tokens = True
            if started is not None and tokens:
                kit.observe_step(tokens, now - max(started, self._kvttl_last_output_at))
        self._kvttl_last_output_at = now
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if kit is not None and kit.awaiting_first_token:
            # (a request that finished in this step reported itself as it finished)
            for rid in [rid for rid in kit.awaiting_first_token
                        if (r := self.requests.get(rid)) is not None and r.num_output_tokens > 0]:
                kit.first_token(rid)
        return outputs

    def program_key(self, request: Request) -> tuple:
        """The kit's queue key; vLLM's FCFS (arrival order) without kvttl's
        connector or with ``program_fcfs`` off."""
        kit = kit_of(self.connector)
        if kit is None or not kit.orders_queue:
            return (request.arrival_time,)
        hints = request_hints(request, kit.config.tenant_field)
        return kit.queue_key(hints.key if hints is not None else None, request.arrival_time)


class KvttlAsyncScheduler(KvttlScheduler, AsyncScheduler):
    """KvttlScheduler over vLLM's AsyncScheduler (chosen by KvttlScheduler
    itself when async scheduling is on; naming it directly works too)."""
