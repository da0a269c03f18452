"""Queue orders (which waiting request runs next) and revocation orders
(which leases to drop under memory pressure).

A queue order is a function from a ``QueueEntry`` to a sort key, a tuple of
numbers, smallest first; the engine calls it whenever its waiting queue
changed (where the order raises or returns anything else, the kit uses
``(request_arrival,)``, request FCFS, and counts it in
``EngineKit.policy_errors``). An order
that learns (``GittinsOrder``) also has ``on_program_finished(num_turns)``,
which the engine kit calls as a program ends; it is per engine, like a TTL
policy, so it is made fresh with each bundle and is not in ``QUEUE_ORDERS``.
A revocation order is a function from ``(LeaseInfo, now)`` to a sort key,
smallest revoked first; the engine calls it when an allocation falls short.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from kvttl.policy.estimator import ProgramLengths

__all__ = [
    "QueueEntry",
    "QueueOrder",
    "request_fcfs",
    "program_fcfs",
    "least_attained_service",
    "GittinsOrder",
    "QUEUE_ORDERS",
    "RevocationOrder",
    "latest_program_first",
]


class QueueEntry(NamedTuple):
    """The numbers a queue order may use about a waiting request."""

    #: when this request (turn) arrived
    request_arrival: float
    #: when its program arrived, as the queue counts it: its first turn's
    #: arrival, or, where that is longer ago than the aging bound
    #: (``EngineKit.max_queue_jump``: the operator's and the policy's), the
    #: bound before ``request_arrival`` (the request's own arrival for a
    #: request without a program)
    program_arrival: float
    #: whether its program holds a live lease (its context is pinned)
    has_lease: bool
    #: engine seconds the program has received so far
    attained_service_s: float
    #: turns the program has finished so far
    turns_done: int = 0


QueueOrder = Callable[[QueueEntry], tuple]


def request_fcfs(e: QueueEntry) -> tuple:
    """vLLM / SGLang default: the oldest request first."""
    return (e.request_arrival,)


def program_fcfs(e: QueueEntry) -> tuple:
    """Continuum: requests of pinned programs first, then by program arrival."""
    return (not e.has_lease, e.program_arrival, e.request_arrival)


def least_attained_service(e: QueueEntry) -> tuple:
    """Autellix PLAS: the program that has received the least service first."""
    return (e.attained_service_s, e.program_arrival, e.request_arrival)


class GittinsOrder:
    """kvttl's order: requests of pinned programs first (their context is
    there); then aging by how much better a bet the program is than a new
    one, on the Gittins index of the learned program lengths
    (``ProgramLengths``: how likely a program is to finish per turn it is
    given). Program FCFS with aging places a turn up to the aging bound
    before its own arrival (``program_arrival``); this order moves it that far
    times ``1 - G(0) / G(k)`` for a program with ``k`` turns done: not at all
    when it is no nearer its end than a program just starting (lengths
    without memory, such as a geometric spread), nearly all the way when its
    end is surely close and a new program's is not (every program about 40
    turns long), and never behind its own arrival.

    Why scaled aging, not the index as the first key: served by index alone,
    a program near its typical end overtook every request however long that
    had waited, which made mean JCT a few percent better and kept starting
    programs waiting (1-5-turn programs 1.37x slower than under vllm, 1.26x
    with plain aging); scaled, no turn moves further than the aging bound,
    the operator's ``max_queue_jump_*`` keeps its meaning, and a request
    without a program id, which does not move, waits behind no turn that
    arrived more than the bound after it. Why relative to G(0): scaled by
    G(k) itself (at most 0.2 on SWE-bench-like lengths) old programs barely
    moved where program FCFS pays most, and where lengths are memoryless every
    returning turn still moved ahead of new programs for no gain
    (benchmarks/README.md). Until enough programs have finished (counted when
    a turn says ``last_turn``) nothing is known and this is program FCFS with
    aging; a program longer than every one seen is ranked as a new one."""

    __slots__ = ("lengths",)

    def __init__(self, lengths: ProgramLengths | None = None):
        self.lengths = ProgramLengths() if lengths is None else lengths

    def __call__(self, e: QueueEntry) -> tuple:
        new = self.lengths.index(0)
        if new is None:
            share = 1.0  # nothing learned yet: program FCFS with aging
        else:
            index = self.lengths.index(e.turns_done)
            share = 0.0 if index is None else max(0.0, 1.0 - new / index)
        moved = (e.request_arrival - e.program_arrival) * share
        return (not e.has_lease, e.request_arrival - moved, e.request_arrival)

    def on_program_finished(self, num_turns: int) -> None:
        self.lengths.add(num_turns)


QUEUE_ORDERS: dict[str, QueueOrder] = {
    "request-fcfs": request_fcfs,
    "program-fcfs": program_fcfs,
    "plas": least_attained_service,
}

#: (lease, now) -> sort key; smallest revoked first.
RevocationOrder = Callable[[object, float], object]


def latest_program_first(lease, now: float):
    """Continuum: unpin the latest-arriving program first (leases carry the
    program's arrival time as their priority)."""
    return -lease.priority
