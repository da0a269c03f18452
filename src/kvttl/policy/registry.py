"""Named scheduling policies: one TTL policy, one queue order, one revocation
order and an offload mode, bundled under the names users compare.

``get_policy(name)`` returns a fresh bundle (learning state is per engine).
"""

from __future__ import annotations

from typing import Callable

import attrs

from kvttl.errors import BadArgumentError
from kvttl.policy.hints import parse_ttl
from kvttl.policy.order import (
    GittinsOrder,
    QueueOrder,
    RevocationOrder,
    latest_program_first,
    least_attained_service,
    program_fcfs,
    request_fcfs,
)
from kvttl.policy.ttl import (
    ContinuumPreviewTTL,
    ContinuumTTL,
    FixedTTL,
    InferCeptTTL,
    KvttlTTL,
    NeverPin,
    OracleTTL,
    TTLPolicy,
)

__all__ = [
    "SchedulingPolicy",
    "OFFLOAD_MODES",
    "register_policy",
    "get_policy",
    "policy_names",
    "DEFAULT_POLICIES",
]

#: When KV blocks go to the host tier (when the engine has one):
#: "none" -- never; "on_finish" -- every finished non-final turn (vLLM +
#: LMCache); "on_unpin" -- a lease's blocks when it expires or is revoked,
#: and a turn that is not pinned as it finishes; "per_turn" -- as each turn
#: finishes, when the TTL policy's ``offload(turn)`` says so (InferCept's swap).
#: In every mode but "none" the TTL policy's ``offload(turn)`` may add a copy.
OFFLOAD_MODES = ("none", "on_finish", "on_unpin", "per_turn")


def _is_ttl_policy(instance, attribute, value):
    if not isinstance(value, TTLPolicy):
        missing = [m for m in ("name", "ttl", "offload", "on_tool_return", "on_admitted", "on_program_finished")
                   if not hasattr(value, m)]
        raise BadArgumentError(f"{type(value).__name__} is not a TTL policy: it lacks {', '.join(missing)}; "
                               "subclass kvttl.policy.TTLPolicy to get the defaults")


@attrs.frozen(kw_only=True)
class SchedulingPolicy:
    """Every decision of one named policy. The engine kit (``kvttl.kit``)
    reads each field at the moment it names, in every integration alike."""

    name: str
    description: str
    #: how long to pin a finished turn, and whether to copy it out (``offload()``)
    ttl: TTLPolicy = attrs.field(validator=_is_ttl_policy)
    #: the waiting queue's sort key, whenever the engine sorts it
    queue_order: QueueOrder
    #: which lease goes first under memory pressure; None: the core's
    #: default (latest granted first)
    revocation: RevocationOrder | None = None
    #: when blocks go to the host tier, if the engine has one (OFFLOAD_MODES)
    offload: str = attrs.field(default="none", validator=attrs.validators.in_(OFFLOAD_MODES))
    #: programs with a lease keep it while their next turn waits in the queue
    hold_while_waiting: bool = True
    #: which leases a request short of blocks may revoke: "any", or
    #: "later-programs" -- only those of programs that arrived after its own
    #: (program-level FCFS applied to memory; the engine preempts instead).
    #: While nothing runs, any lease may go: pins never stop the engine.
    revokes: str = attrs.field(default="any", validator=attrs.validators.in_(("any", "later-programs")))
    #: aging: a program's turn queues as if it arrived at most this many
    #: re-prefills of its context before the turn itself (None: back to the
    #: program's first arrival, Continuum's unbounded order), so a short
    #: program that arrives behind long ones is not starved. Live engines
    #: take the tighter of this and the operator's KitConfig bound.
    max_queue_jump_prefills: float | None = None


#: kvttl's aging bound (SchedulingPolicy.max_queue_jump_prefills).
KVTTL_QUEUE_JUMP_PREFILLS = 30.0

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
        try:
            seconds = parse_ttl(name[len("fixed:"):])
        except BadArgumentError as e:
            raise BadArgumentError(f"policy {name!r}: {e}") from None
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
    return SchedulingPolicy(
        name="kvttl",
        description="tau* that caps hints by evidence; pinned first, then program FCFS aged by how much nearer "
                    "its end a program is than a new one (Gittins index of learned program lengths); unpinned "
                    "blocks offloaded to host DRAM",
        ttl=KvttlTTL(), queue_order=GittinsOrder(), revocation=latest_program_first,
        offload="on_unpin", revokes="later-programs", max_queue_jump_prefills=KVTTL_QUEUE_JUMP_PREFILLS,
    )


def _oracle(future=None, **facts):
    """kvttl's bundle with the clairvoyant TTL: the bound for any TTL rule on
    the same engine, queue order and host tier."""
    return attrs.evolve(_kvttl(**facts), name="oracle", ttl=OracleTTL(future),
                        description="clairvoyant bound: kvttl with each tool's true duration known")


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
    ttl=InferCeptTTL(), queue_order=request_fcfs, offload="per_turn"))
register_policy("continuum-preview", lambda **_: SchedulingPolicy(
    name="continuum-preview", description="released Continuum code: pin 2 s if the tool's mean <= 2 s, program FCFS",
    ttl=ContinuumPreviewTTL(), queue_order=program_fcfs, revocation=latest_program_first,
    revokes="later-programs"))
register_policy("continuum", lambda **_: SchedulingPolicy(
    name="continuum", description="Continuum paper: learned tau*, program FCFS, unpin latest program first",
    ttl=ContinuumTTL(), queue_order=program_fcfs, revocation=latest_program_first,
    revokes="later-programs"))
register_policy("kvttl", _kvttl)
register_policy("oracle", _oracle)

DEFAULT_POLICIES = ["vllm", "vllm-lmcache", "autellix", "infercept", "continuum-preview", "continuum", "kvttl",
                    "oracle"]
