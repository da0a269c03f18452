"""Named scheduling policies: one TTL policy, one queue order, one revocation
order and an offload mode, bundled under the names users compare.

``get_policy(name)`` returns a fresh bundle (learning state is per engine).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

import attrs

from kvttl.errors import BadArgumentError, KvttlError, PolicyError
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
    "ENGINE_FACTS",
    "import_policy_modules",
]

#: When KV blocks go to the host tier (when the engine has one):
#: "none" -- never; "on_finish" -- every finished non-final turn (vLLM +
#: LMCache); "on_unpin" -- a lease's blocks when it expires or is revoked,
#: and a turn that is not pinned as it finishes; "per_turn" -- as each turn
#: finishes, when the TTL policy's ``offload(turn)`` says so (InferCept's swap).
#: In every mode but "none" the TTL policy's ``offload(turn)`` may add a copy.
OFFLOAD_MODES = ("none", "on_finish", "on_unpin", "per_turn")


_TTL_POLICY_MEMBERS = ("name", "ttl", "offload", "set_prior", "on_tool_return", "on_admitted", "on_program_finished",
                       "on_lease_ended")


def _is_ttl_policy(instance, attribute, value):
    if isinstance(value, type):
        raise BadArgumentError(f"ttl: give an instance of {value.__name__} ({value.__name__}()), not the class")
    if not isinstance(value, TTLPolicy):
        missing = [m for m in _TTL_POLICY_MEMBERS if not hasattr(value, m)]
        raise BadArgumentError(f"ttl: {type(value).__name__} is not a TTL policy: it lacks {', '.join(missing)}; "
                               "subclass kvttl.policy.TTLPolicy to get the defaults")


def _is_order(optional: bool):
    def check(instance, attribute, value):
        if value is None and optional:
            return
        if isinstance(value, type) or not callable(value):
            raise BadArgumentError(f"{attribute.name}: expected a function of the waiting entry (see "
                                   f"kvttl.policy.order{', or None' if optional else ''}), got {value!r:.60}")
    return check


def _is_jump_bound(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise BadArgumentError(f"max_queue_jump_prefills: expected None or a finite number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class SchedulingPolicy:
    """Every decision of one named policy. The engine kit (``kvttl.kit``)
    reads each field at the moment it names, in every integration alike."""

    name: str
    description: str
    #: how long to pin a finished turn, and whether to copy it out (``offload()``)
    ttl: TTLPolicy = attrs.field(validator=_is_ttl_policy)
    #: the waiting queue's sort key, whenever the engine sorts it
    queue_order: QueueOrder = attrs.field(validator=_is_order(optional=False))
    #: which lease goes first under memory pressure; None: the core's
    #: default (latest granted first)
    revocation: RevocationOrder | None = attrs.field(default=None, validator=_is_order(optional=True))
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
    max_queue_jump_prefills: float | None = attrs.field(default=None, validator=_is_jump_bound)


#: kvttl's aging bound (SchedulingPolicy.max_queue_jump_prefills).
KVTTL_QUEUE_JUMP_PREFILLS = 30.0

# ---- registry -----------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., SchedulingPolicy]] = {}


#: The facts an engine may pass a policy's factory, by name: ``capacity_blocks``
#: (the device pool's size) and ``reload`` (a ReloadModel) from every engine kit, and
#: ``future`` (what a replay knows ahead, for the oracle) from the simulator. Any of
#: them may be missing: ``load_config`` builds the policy once with none, to check it.
ENGINE_FACTS = ("capacity_blocks", "reload", "future")


def register_policy(name: str, factory: Callable[..., SchedulingPolicy], *, replace: bool = False) -> None:
    """Adds a named policy. ``factory(**engine_facts)`` builds a fresh bundle
    (a ``SchedulingPolicy``) each time an engine starts; it is given those of
    ``ENGINE_FACTS`` that its signature names (all of them with ``**facts``),
    and may use or ignore them. ``replace``: a name already registered is
    overwritten (re-running a notebook cell) instead of refused."""
    if not isinstance(name, str) or not name or name != name.strip() or "," in name or any(c.isspace() for c in name):
        raise BadArgumentError(f"policy name must be a non-empty string without spaces or commas (`--policies` "
                               f"splits on commas), got {name!r}")
    if name.startswith("fixed:"):
        raise BadArgumentError(f"policy name {name!r}: names starting with 'fixed:' are the built-in fixed TTLs")
    if isinstance(factory, type) and issubclass(factory, SchedulingPolicy) or not callable(factory):
        raise BadArgumentError(f"policy {name!r}: the factory must be a function returning a SchedulingPolicy, "
                               f"got {factory!r:.60}")
    if name in _REGISTRY and not replace:
        raise BadArgumentError(f"policy {name!r} is already registered (register_policy(..., replace=True) "
                               "overwrites it)")
    _REGISTRY[name] = factory


def import_policy_modules(modules, *, source: str = "policy_modules") -> tuple[str, ...]:
    """Imports each named module (``"mypkg.policies"``), for the policies it
    registers as it is imported; the names, checked, as a tuple. This is how
    an engine started from the command line (``vllm serve``, SGLang, ``kvttl
    simulate --import``) gets a policy that lives in the user's code: the
    module must be importable in the engine's process."""
    if isinstance(modules, str):
        modules = (modules,)
    try:
        names = tuple(modules)
    except TypeError:
        raise BadArgumentError(f"{source}: expected a list of module names, got {modules!r:.60}") from None
    for name in names:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise BadArgumentError(f"{source}: {name!r:.60} is not a module name (such as mypkg.policies)")
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 -- whatever the user's module raises as it loads
            raise BadArgumentError(f"{source}: cannot import {name!r}: {type(e).__name__}: {e}") from e
    return names


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
    try:
        policy = factory(**_facts_for(factory, engine_facts))
    except KvttlError:
        raise
    except Exception as e:  # noqa: BLE001 -- the factory is the policy author's code
        raise PolicyError(f"policy {name!r}: its factory raised {type(e).__name__}: {e}") from e
    if not isinstance(policy, SchedulingPolicy):
        raise PolicyError(f"policy {name!r}: its factory returned {type(policy).__name__}, not a SchedulingPolicy")
    return policy


def _facts_for(factory, facts: dict) -> dict:
    """Those of ``facts`` that ``factory`` takes by name (all with ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): give it everything
        return facts
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return facts
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in facts.items() if k in named}


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
