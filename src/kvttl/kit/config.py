"""The engine kit's settings, and the one loader every adapter uses for them.

Adapters read their settings from wherever their engine keeps config (vLLM:
``kv_connector_extra_config``; SGLang: ``$KVTTL_SGLANG_CONFIG``) and hand the
mapping to :func:`load_config`, which fails at engine start, naming the key,
on anything it cannot use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import attrs

from kvttl.errors import BadArgumentError, KvttlError
from kvttl.policy import MAX_TTL_S, OFFLOAD_MODES, get_policy, import_policy_modules
from kvttl.policy.hints import MAX_TOOL_BYTES, is_tool_name

__all__ = ["KitConfig", "load_config", "CONFIG_KEYS", "MAX_TOOL_PRIORS"]

#: Tools ``tool_priors_s`` may name (the duration estimator keeps at most this many per-tool priors).
MAX_TOOL_PRIORS = 4096

logger = logging.getLogger("kvttl.kit")

#: Old key -> the key it became; read with a warning.
_RENAMED = {"ttl_policy": "policy"}


def _as_pairs(given) -> tuple:
    """A mapping of tool -> seconds as sorted (tool, seconds) pairs, so that the
    frozen config stays hashable; pairs are taken as they are."""
    items = given.items() if isinstance(given, Mapping) else given
    return tuple(sorted((tool, seconds) for tool, seconds in items))


@attrs.frozen(kw_only=True)
class KitConfig:
    #: the scheduling policy bundle (``kvttl info`` lists them; ``fixed:<ttl>`` works too)
    policy: str = "continuum"
    #: modules to import first, which register policies of their own
    #: (``kvttl.policy.register_policy``): how a policy in the user's code reaches
    #: an engine started from the command line
    policy_modules: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: most of the engine's blocks that leases may pin at once, in [0, 1]
    pinned_share_cap: float = 0.8
    #: prefill rate behind Reload(r): the prior, until the engine's own steps
    #: say otherwise (``measure_costs``)
    reload_tokens_per_s: float = 10_000.0
    #: learn the engine's prefill rate and host-tier bandwidth from its own
    #: step and copy timings (engines that report them); off: the prior stays
    measure_costs: bool = True
    #: seconds a tool is expected to take, before the engine has seen it
    #: return (``{"bash": 1.5, "*": 2}``; ``*`` is every other tool): the mean
    #: of the exponential prior the TTL policy starts from. Kept as sorted
    #: (tool, seconds) pairs, so the config is hashable
    tool_priors_s: tuple = attrs.field(factory=tuple, converter=_as_pairs)
    #: order the waiting queue by program (Continuum's program-level FCFS)
    program_fcfs: bool = True
    #: how far back a turn's program arrival may place it in the queue.
    #: Program-level FCFS lets an old program's turn overtake every request
    #: that came after the program began, so traffic without a program id
    #: waits behind every agent. A turn overtakes only requests that arrived
    #: at most this many re-prefills of its context before it, at the
    #: engine's measured prefill rate (pinned turns still go first), so the
    #: bound means the same on a fast or a slow engine
    max_queue_jump_prefills: float | None = 3.0
    #: the same bound in seconds, instead of prefills, when set. Both None:
    #: unbounded, Continuum's order
    max_queue_jump_s: float | None = None
    #: when to copy blocks to a host tier; None: the policy's choice, or
    #: "on_unpin" when the engine has a host tier and the policy names none
    offload: str | None = None
    #: programs remembered between turns; idle ones beyond this are forgotten
    max_programs: int = 65536
    #: an idle program (no lease, no turn in flight) quiet this long is forgotten
    forget_after_s: float = 3600.0
    #: consecutive engine steps that schedule nothing, while leases hold
    #: memory, before one lease is given back (pins never stall the engine)
    stall_steps: int = 4
    #: the longest lease the server grants, in seconds: a client's ``ttl``
    #: above it is clamped (the response says so), and so is the policy's
    max_ttl_s: float = 600.0
    #: most of the engine's blocks that one tenant's leases may pin at once,
    #: in [0, 1] (a tenant: requests with one cache-isolation key, such as
    #: vLLM's ``cache_salt``); None: only ``pinned_share_cap`` applies
    tenant_pinned_share: float | None = None
    #: a request field that a trusted gateway sets to the client's tenant
    #: (vLLM: this key of the request's ``extra_args``, ``vllm_xargs`` over
    #: HTTP); program ids are then scoped by it as well as by the engine's
    #: cache-isolation key. The gateway must overwrite what clients send.
    #: None: the isolation key alone (SGLang: its caller-defined ``extra_key``)
    tenant_field: str | None = None


CONFIG_KEYS = tuple(f.name for f in attrs.fields(KitConfig))


def _number(source: str, key: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
            integer: bool = False) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    except OverflowError:  # an int past any float
        ok = False
    if ok and integer:
        ok = isinstance(value, int) or float(value).is_integer()
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high != math.inf:
            bound += f" and <= {high:g}"
        raise BadArgumentError(f"{source}: {key} must be {kind} {bound}, got {value!r:.40}")
    return int(value) if integer else float(value)


def _tool_priors(source: str, given: Any) -> dict:
    if not isinstance(given, Mapping):
        raise BadArgumentError(f"{source}: tool_priors_s must be an object of tool -> seconds, got {given!r}")
    if len(given) > MAX_TOOL_PRIORS:
        raise BadArgumentError(f"{source}: tool_priors_s has {len(given)} tools, at most {MAX_TOOL_PRIORS}")
    priors = {}
    for tool, seconds in given.items():
        if not tool or not is_tool_name(tool):
            raise BadArgumentError(f"{source}: tool_priors_s: {tool!r} is not a tool name (a non-empty string of "
                                   f"at most {MAX_TOOL_BYTES} bytes without control characters, or '*')")
        priors[tool] = _number(source, f"tool_priors_s[{tool!r}]", seconds, low=0.0, high=MAX_TTL_S, low_open=True)
    return priors


def load_config(given: Mapping | None, *, source: str = "kvttl config",
                extra_keys: tuple[str, ...] = ()) -> tuple[KitConfig, dict]:
    """``(KitConfig, extras)`` from a mapping of settings. ``extra_keys`` are
    the adapter's own (vLLM's host tier sizes), returned untouched in
    ``extras`` for it to check. Unknown keys, bad values and unknown policies
    raise BadArgumentError naming ``source`` and the key."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise BadArgumentError(f"{source} must be a mapping (a JSON object), got {type(given).__name__}")
    values, extras = {}, {}
    for key, value in given.items():
        if key in _RENAMED:
            new = _RENAMED[key]
            if new in given:
                raise BadArgumentError(f"{source}: give {new!r} or its old name {key!r}, not both")
            logger.warning("%s: %r is now %r; the old name still works for now", source, key, new)
            key = new
        if key in CONFIG_KEYS:
            values[key] = value
        elif key in extra_keys:
            extras[key] = value
        else:
            known = sorted(CONFIG_KEYS + tuple(extra_keys))
            raise BadArgumentError(f"{source}: unknown key {key!r}; known: {', '.join(known)}")
    if "policy_modules" in values:  # first: they may register the policy named
        values["policy_modules"] = import_policy_modules(values["policy_modules"], source=f"{source}: policy_modules")
    if "policy" in values:
        if not isinstance(values["policy"], str):
            raise BadArgumentError(f"{source}: policy must be a policy name, got {values['policy']!r}")
        try:
            get_policy(values["policy"])  # an unknown name, or a factory that fails, fails here
        except KvttlError as e:
            raise type(e)(f"{source}: {e}") from None  # names the policy
    if "pinned_share_cap" in values:
        values["pinned_share_cap"] = _number(source, "pinned_share_cap", values["pinned_share_cap"], low=0.0, high=1.0)
    if "reload_tokens_per_s" in values:
        values["reload_tokens_per_s"] = _number(source, "reload_tokens_per_s", values["reload_tokens_per_s"], low=0.0,
                                                low_open=True)
    for key in ("program_fcfs", "measure_costs"):
        if key in values and not isinstance(values[key], bool):
            raise BadArgumentError(f"{source}: {key} must be true or false, got {values[key]!r}")
    for key in ("max_queue_jump_prefills", "max_queue_jump_s"):
        if values.get(key) is not None:
            values[key] = _number(source, key, values[key], low=0.0)
    if values.get("max_queue_jump_s") is not None and values.get("max_queue_jump_prefills") is not None:
        raise BadArgumentError(f"{source}: set max_queue_jump_s or max_queue_jump_prefills, not both")
    if "tool_priors_s" in values:
        values["tool_priors_s"] = _tool_priors(source, values["tool_priors_s"])
    if values.get("offload") is not None and values["offload"] not in OFFLOAD_MODES:
        raise BadArgumentError(f"{source}: offload must be one of {', '.join(OFFLOAD_MODES)}, "
                               f"got {values['offload']!r}")
    if "max_programs" in values:
        values["max_programs"] = _number(source, "max_programs", values["max_programs"], low=1, integer=True)
    if "forget_after_s" in values:
        values["forget_after_s"] = _number(source, "forget_after_s", values["forget_after_s"], low=0.0, low_open=True)
    if "max_ttl_s" in values:
        values["max_ttl_s"] = _number(source, "max_ttl_s", values["max_ttl_s"], low=0.0, high=MAX_TTL_S,
                                      low_open=True)
    if values.get("tenant_pinned_share") is not None:
        values["tenant_pinned_share"] = _number(source, "tenant_pinned_share", values["tenant_pinned_share"],
                                                low=0.0, high=1.0)
    if values.get("tenant_field") is not None and (not isinstance(values["tenant_field"], str)
                                                  or not values["tenant_field"].strip()):
        raise BadArgumentError(f"{source}: tenant_field must be a field name, got {values['tenant_field']!r}")
    if "stall_steps" in values:
        values["stall_steps"] = _number(source, "stall_steps", values["stall_steps"], low=1, integer=True)
    return KitConfig(**values), extras
