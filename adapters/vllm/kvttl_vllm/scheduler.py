"""Program-level FCFS for vLLM's waiting queue, through ``--scheduler-cls``.

    vllm serve MODEL --scheduler-cls kvttl_vllm.scheduler.KvttlScheduler \\
      --kv-transfer-config '{"kv_connector": "KvttlConnector", ...}'

Stock vLLM serves its waiting queue first come, first served *per request*:
an agent's returning turn queues behind every request that arrived while its
tool ran. Continuum orders by *program* instead: a turn is as old as its
program's first turn, and a turn whose program holds a pin goes first (its
context is already in memory). Requests without a program id are programs of
one turn, so without agents this is exactly vLLM's FCFS.

Only the queue's order changes (and only under ``--scheduling-policy fcfs``,
vLLM's default); admission, preemption and the KV cache stay vLLM's own.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from kvttl_vllm.connector import KvttlConnector, request_hints

__all__ = ["KvttlScheduler", "ProgramFCFSQueue"]

#: Programs whose first arrival is remembered (least recently seen forgotten first).
MAX_PROGRAMS = 65536


class ProgramFCFSQueue(RequestQueue):
    """vLLM's RequestQueue ordered by (class, program arrival, request arrival).

    Why a heap of keyed entries: the key of a request is fixed when it enters
    the queue (its program's first arrival, and whether the program holds a
    pin right then: a waiting turn's lease does not expire), so a binary heap
    gives O(log n) insertion and pop. Prepended requests (vLLM prepends the
    ones it preempted or skipped) take class -1 and go first, as in vLLM's
    FCFS deque. A sequence number breaks ties, so requests are never compared.
    """

    def __init__(self, key_of: Callable[[Request], tuple]):
        self._heap: list[tuple] = []
        self._key_of = key_of
        self._seq = itertools.count()

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (*self._key_of(request), next(self._seq), request))

    def prepend_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (-1, 0.0, 0.0, -next(self._seq), request))

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
        for entry in sorted(self._heap):
            yield entry[-1]


class KvttlScheduler(Scheduler):
    """vLLM's Scheduler with program-level FCFS waiting queues."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._program_arrival: OrderedDict = OrderedDict()
        if self.policy == SchedulingPolicy.FCFS:
            if self.waiting or self.kv_holding_waiting:
                raise RuntimeError("KvttlScheduler: the waiting queues must be empty at start")
            self.waiting = ProgramFCFSQueue(self.program_key)
            self.kv_holding_waiting = ProgramFCFSQueue(self.program_key)

    def program_key(self, request: Request) -> tuple:
        """(0 if the program holds a pin else 1, program's first arrival, arrival)."""
        hints = request_hints(request)
        if hints is None:
            return (1, request.arrival_time, request.arrival_time)
        program = hints["program_id"]
        first = self._program_arrival.pop(program, request.arrival_time)
        if not hints["last_turn"]:
            self._program_arrival[program] = first  # most recently seen last
            while len(self._program_arrival) > MAX_PROGRAMS:
                self._program_arrival.popitem(last=False)
        connector = self.connector
        pinned = isinstance(connector, KvttlConnector) and connector.holds_lease(program)
        return (0 if pinned else 1, first, request.arrival_time)
