"""Named scheduling policies: one TTL policy, one queue order, one revocation
order and an offload mode, bundled under the names users compare.

``get_policy(name)`` returns a fresh bundle (learning state is per engine).
"""

from __future__ import annotations

import math
from typing import Callable

import attrs

from kvttl.errors import BadArgumentError
from kvttl.policy.hints import parse_ttl
from kvttl.policy.order import (
    QueueOrder,
    RevocationOrder,
    latest_program_first,
    least_attained_service,
    program_fcfs,
    request_fcfs,
)
from kvttl.policy.ttl import ContinuumPreviewTTL, ContinuumTTL, FixedTTL, NeverPin, TTLPolicy, TurnContext

__all__ = [
    "SchedulingPolicy",
    "InferCeptTTL",
    "register_policy",
    "get_policy",
    "policy_names",
    "DEFAULT_POLICIES",
]

#: What happens to KV blocks on the host tier (when the engine has one):
#: "none" -- never copied; "on_finish" -- every finished request's blocks are
#: copied (vLLM + LMCache); "on_unpin" -- a lease's blocks are copied when it
#: expires or is revoked, instead of simply becoming evictable.
OFFLOAD_MODES = ("none", "on_finish", "on_unpin")


@attrs.frozen(kw_only=True)
class SchedulingPolicy:
    name: str
    description: str
    ttl: TTLPolicy
    queue_order: QueueOrder
    #: None: the core's default (latest granted first)
    revocation: RevocationOrder | None = None
    offload: str = attrs.field(default="none", validator=attrs.validators.in_(OFFLOAD_MODES))
    pinned_share_cap: float = 1.0
    #: programs with a lease keep it while their next turn waits in the queue
    hold_while_waiting: bool = True
    #: which leases a request short of blocks may revoke: "any", or
    #: "later-programs" -- only those of programs that arrived after its own
    #: (program-level FCFS applied to memory; the engine preempts instead).
    #: While nothing runs, any lease may go: pins never stop the engine.
    revokes: str = attrs.field(default="any", validator=attrs.validators.in_(("any", "later-programs")))


class InferCeptTTL(ContinuumTTL):
    """InferCept-style choice per interception: preserve, discard or swap,
    whichever wastes the least memory x time.

    - preserve: the context's tokens stay resident for the expected call time;
    - discard:  recomputing it later stalls everything resident for the prefill time;
    - swap:     moving it out and back stalls everything resident for the transfer time.

    Preserve is a lease with no deadline (revocable under pressure); swap
    copies the blocks to the host tier; discard frees them.
    """

    name = "infercept"

    def _choice(self, turn: TurnContext) -> str:
        expected = self.estimator.mean(turn.tool)
        resident = max(turn.used_tokens, turn.num_tokens)
        waste = {"preserve": expected * turn.num_tokens, "discard": turn.prefill_s * resident}
        if turn.host_reload_s is not None:
            waste["swap"] = 2 * turn.host_reload_s * resident
        return min(waste, key=waste.get)

    def ttl(self, turn: TurnContext) -> float:
        return math.inf if self._choice(turn) == "preserve" else 0.0

    def offload(self, turn: TurnContext) -> bool:
        return self._choice(turn) == "swap"


# ---- registry -----------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., SchedulingPolicy]] = {}


def register_policy(name: str, factory: Callable[..., SchedulingPolicy]) -> None:
    """Adds a named policy. ``factory(**engine_facts)`` builds a fresh bundle;
    engines pass ``capacity_blocks`` and ``reload`` (a ReloadModel), which a
    factory may use or ignore."""
    if name in _REGISTRY:
        raise BadArgumentError(f"policy {name!r} is already registered")
    _REGISTRY[name] = factory


def policy_names() -> list[str]:
    return sorted(_REGISTRY) + ["fixed:<ttl>"]


def get_policy(name: str, **engine_facts) -> SchedulingPolicy:
    """A fresh bundle by name: a registered name, or ``fixed:<ttl>`` with an
    Anthropic-style duration (``fixed:2s``, ``fixed:5m``)."""
    if name.startswith("fixed:"):
        seconds = parse_ttl(name[len("fixed:"):])
        return SchedulingPolicy(
            name=name, description=f"pin every non-final turn for {seconds:g} s, program FCFS",
            ttl=FixedTTL(seconds), queue_order=program_fcfs, revocation=latest_program_first,
            revokes="later-programs",
        )
    factory = _REGISTRY.get(name)
    if factory is None:
        raise BadArgumentError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    return factory(**engine_facts)


def _kvttl(**_):
    ttl = ContinuumTTL()
    ttl.name = "kvttl"
    return SchedulingPolicy(
        name="kvttl",
        description="Continuum's tau*, program FCFS and revocation, and unpinned blocks offloaded to host DRAM",
        ttl=ttl, queue_order=program_fcfs, revocation=latest_program_first,
        offload="on_unpin", revokes="later-programs",
    )


register_policy("vllm", lambda **_: SchedulingPolicy(
    name="vllm", description="stock engine: request FCFS, no pins, LRU prefix cache",
    ttl=NeverPin(), queue_order=request_fcfs, hold_while_waiting=False))
register_policy("vllm-lmcache", lambda **_: SchedulingPolicy(
    name="vllm-lmcache", description="request FCFS, no pins, every finished request copied to host DRAM",
    ttl=NeverPin(), queue_order=request_fcfs, offload="on_finish", hold_while_waiting=False))
register_policy("autellix", lambda **_: SchedulingPolicy(
    name="autellix", description="Autellix PLAS: least attained service per program, no pins",
    ttl=NeverPin(), queue_order=least_attained_service, hold_while_waiting=False))
register_policy("infercept", lambda **_: SchedulingPolicy(
    name="infercept", description="InferCept: preserve / discard / swap per interception, request FCFS",
    ttl=InferCeptTTL(), queue_order=request_fcfs))
register_policy("continuum-preview", lambda **_: SchedulingPolicy(
    name="continuum-preview", description="released Continuum code: pin 2 s if the tool's mean <= 2 s, program FCFS",
    ttl=ContinuumPreviewTTL(), queue_order=program_fcfs, revocation=latest_program_first,
    revokes="later-programs"))
register_policy("continuum", lambda **_: SchedulingPolicy(
    name="continuum", description="Continuum paper: learned tau*, program FCFS, unpin latest program first",
    ttl=ContinuumTTL(), queue_order=program_fcfs, revocation=latest_program_first,
    revokes="later-programs"))
register_policy("kvttl", _kvttl)

DEFAULT_POLICIES = ["vllm", "vllm-lmcache", "autellix", "infercept", "continuum-preview", "continuum", "kvttl"]
