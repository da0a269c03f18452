"""The policy layer: every decision kvttl makes, as small engine-free objects.

- TTL policies (``kvttl.policy.ttl``): how long to pin a finished turn.
- Estimators (``kvttl.policy.estimator``): tool durations, eviction delay, eta.
- Orders (``kvttl.policy.order``): which waiting request runs next, which lease
  to drop under pressure.
- Bundles (``kvttl.policy.registry``): the named policies users compare.

Policies see numbers, never engine objects; they import only ``kvttl.core``
and below.
"""

from kvttl.policy.estimator import DurationCDF, ProgramLengths, SlidingMean, ToolDurationEstimator, TurnCorrelation
from kvttl.policy.hints import (MAX_TTL_S, TurnHints, is_tool_name, parse_ttl, parse_turn_hints, program_key,
                               tool_from_output)
from kvttl.policy.order import (
    QUEUE_ORDERS,
    GittinsOrder,
    QueueEntry,
    latest_program_first,
    least_attained_service,
    program_fcfs,
    request_fcfs,
)
from kvttl.policy.registry import (
    DEFAULT_POLICIES,
    ENGINE_FACTS,
    OFFLOAD_MODES,
    SchedulingPolicy,
    get_policy,
    import_policy_modules,
    policy_names,
    register_policy,
)
from kvttl.policy.reload import ReloadModel
from kvttl.policy.ttl import (
    ContinuumPreviewTTL,
    ContinuumTTL,
    FixedTTL,
    InferCeptTTL,
    KvttlTTL,
    NeverPin,
    OracleTTL,
    TTLPolicy,
    TurnContext,
    continuum_tau,
)

__all__ = [
    "DurationCDF", "ProgramLengths", "SlidingMean", "ToolDurationEstimator", "TurnCorrelation",
    "MAX_TTL_S", "TurnHints", "parse_ttl", "parse_turn_hints", "program_key", "tool_from_output", "is_tool_name",
    "QUEUE_ORDERS", "GittinsOrder", "QueueEntry", "latest_program_first", "least_attained_service",
    "program_fcfs", "request_fcfs",
    "DEFAULT_POLICIES", "ENGINE_FACTS", "OFFLOAD_MODES", "InferCeptTTL", "SchedulingPolicy", "get_policy",
    "import_policy_modules", "policy_names", "register_policy", "ReloadModel",
    "ContinuumPreviewTTL", "ContinuumTTL", "FixedTTL", "KvttlTTL", "NeverPin", "OracleTTL", "TTLPolicy", "TurnContext",
    "continuum_tau",
]
