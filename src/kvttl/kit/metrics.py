"""kvttl's metrics, the same names and meanings in every engine.

Each adapter exports these in its engine's own registry, under the engine's
prefix (``vllm:``, ``sglang:``):

- ``kvttl_leases_<event>_total`` for each of the kit's LEASE_EVENTS
  (granted, refused, hit, expired, revoked, released);
- ``kvttl_policy_errors_total``: calls into the policy's own code that
  failed, which the kit skipped (``EngineKit.policy_errors``);
- ``kvttl_offloaded_bytes_total`` / ``kvttl_reloaded_bytes_total``: host-tier
  traffic, per worker (per rank);
- gauges ``kvttl_leases`` (live leases), ``kvttl_pinned_blocks`` (blocks they
  pin) and ``kvttl_host_blocks`` (host slots holding content).
"""

from __future__ import annotations

from kvttl.kit.lifecycle import LEASE_EVENTS

__all__ = ["BYTE_COUNTERS", "POLICY_COUNTERS", "COUNTERS", "LEASE_GAUGES", "StatsReporter"]

#: Host-tier traffic, counted; exported as ``<engine>:kvttl_<name>_total``.
BYTE_COUNTERS = ("offloaded_bytes", "reloaded_bytes")
#: The policy's failures, counted; exported as ``<engine>:kvttl_policy_errors_total``.
POLICY_COUNTERS = ("policy_errors",)
COUNTERS = LEASE_EVENTS + POLICY_COUNTERS + BYTE_COUNTERS
#: Levels, exported as gauges: live leases, the blocks they pin, host slots in use.
LEASE_GAUGES = ("leases", "pinned_blocks", "host_blocks")


class StatsReporter:
    """What changed since the last report, or None: a quiet engine sends
    nothing, and finds that out from a few integers (this runs every step)."""

    def __init__(self):
        self._reported = dict.fromkeys(COUNTERS + LEASE_GAUGES, 0)
        self._seen = None

    def report(self, kit, byte_stats: dict, host_blocks: int) -> dict | None:
        """Counter increments since the previous report and the gauges' values now."""
        seen = (kit.changes, byte_stats["offloaded_bytes"], byte_stats["reloaded_bytes"], host_blocks)
        if seen == self._seen:
            return None
        self._seen = seen
        now = {**kit.stats, "policy_errors": kit.policy_errors, **{k: byte_stats[k] for k in BYTE_COUNTERS},
               "leases": kit.num_leases,
               "pinned_blocks": kit.num_pinned, "host_blocks": host_blocks}
        if now == self._reported:
            return None
        data = {k: now[k] - self._reported[k] for k in COUNTERS if now[k] != self._reported[k]}
        data.update({k: now[k] for k in LEASE_GAUGES})
        self._reported = now
        return data
