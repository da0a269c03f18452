"""Queue orders (which waiting request runs next) and revocation orders
(which leases to drop under memory pressure).

A queue order is a function from a ``QueueEntry`` to a sort key, smallest
first; the engine calls it whenever its waiting queue changed. A revocation
order is a function from ``(LeaseInfo, now)`` to a sort key, smallest revoked
first; the engine calls it when an allocation falls short.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

__all__ = [
    "QueueEntry",
    "QueueOrder",
    "request_fcfs",
    "program_fcfs",
    "least_attained_service",
    "QUEUE_ORDERS",
    "RevocationOrder",
    "latest_program_first",
]


class QueueEntry(NamedTuple):
    """The numbers a queue order may use about a waiting request."""

    #: when this request (turn) arrived
    request_arrival: float
    #: when its program's first turn arrived
    program_arrival: float
    #: whether its program holds a live lease (its context is pinned)
    has_lease: bool
    #: engine seconds the program has received so far
    attained_service_s: float


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
