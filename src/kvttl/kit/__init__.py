"""The engine kit: one engine-neutral program and lease lifecycle that every
integration drives -- the vLLM and SGLang adapters, the simulator, and any
engine of your own (see ``examples/``).

- ``EngineKit``  programs, the turn lifecycle, grants, hand-over, expiry,
  revocation in the policy's order, offload decisions, queue keys, counters
- ``EngineHooks`` what an engine gives it: pin, unpin, copy out
- ``KitConfig`` / ``load_config``  the settings, validated once for every adapter
- ``read_hints`` / ``make_kv_hints``  the client's turn hints, one format everywhere
- ``DeadlineWaker``  wakes an idle engine when a lease is due
- ``HostIndex`` / ``page_hashes`` / ``host_tier_slots``  the index half of a
  host tier (the copying half is ``kvttl.swap.copier.HostCopier``)

It sits above ``kvttl.core`` and ``kvttl.policy`` and below everything that
touches an engine; it imports neither torch nor an engine.
"""

from kvttl.kit.config import CONFIG_KEYS, KitConfig, load_config
from kvttl.kit.hints import (HINT_ACTION_TYPE, HINT_ACTION_VERSION, HINT_WARNINGS, WarningBudget, make_kv_hints,
                             payload_from_envelope, read_hints)
from kvttl.kit.host import HOST_TIER_KEYS, HostIndex, host_tier_slots, page_hashes
from kvttl.kit.lifecycle import LEASE_EVENTS, REFUSAL_REASONS, REVOCATION_CAUSES, EngineHooks, EngineKit, FinishOutcome, Turn, hint_report
from kvttl.kit.programs import Program, ProgramTable
from kvttl.kit.waker import DeadlineWaker

__all__ = [
    "EngineKit", "EngineHooks", "Turn", "FinishOutcome", "LEASE_EVENTS", "REFUSAL_REASONS", "REVOCATION_CAUSES", "hint_report",
    "KitConfig", "load_config", "CONFIG_KEYS",
    "HINT_ACTION_TYPE", "HINT_ACTION_VERSION", "HINT_WARNINGS", "WarningBudget", "make_kv_hints",
    "payload_from_envelope", "read_hints",
    "Program", "ProgramTable", "DeadlineWaker",
    "HostIndex", "page_hashes", "host_tier_slots", "HOST_TIER_KEYS",
]
