"""kvttl's counters in SGLang's Prometheus metrics (``--enable-metrics``).

The names and meanings are the kit's (``kvttl.kit.metrics``), as in vLLM,
under ``sglang:``: ``sglang:kvttl_leases_<event>_total``,
``sglang:kvttl_offloaded_bytes_total`` / ``sglang:kvttl_reloaded_bytes_total``,
and the gauges ``sglang:kvttl_leases``, ``sglang:kvttl_pinned_blocks``,
``sglang:kvttl_host_blocks``. Each rank's series carries the labels of
SGLang's own radix-cache metrics (``tp_rank``, ``pp_rank``, ...), as SGLang
labels its own: every rank takes the same lease decisions, so the lease
series agree across ranks (read one, not the sum); host bytes are each
rank's own shard.
"""

from __future__ import annotations

from kvttl.kit import LEASE_EVENTS
from kvttl.kit.metrics import BYTE_COUNTERS, LEASE_GAUGES, POLICY_COUNTERS, StatsReporter

__all__ = ["KvttlMetrics"]

#: name -> prometheus metric, made once per process: prometheus_client
#: refuses a second metric of the same name, and one process may build more
#: than one cache (a restart of the tree, tests). Each cache takes a child.
_FAMILIES: dict[str, object] = {}


def _family(kind: str, name: str, documentation: str, labelnames: tuple):
    family = _FAMILIES.get(name)
    if family is None:
        from prometheus_client import Counter, Gauge

        if kind == "counter":
            family = Counter(name=name, documentation=documentation, labelnames=labelnames)
        else:  # SGLang's registry is multiprocess: a level is the latest value its rank wrote
            family = Gauge(name=name, documentation=documentation, labelnames=labelnames,
                           multiprocess_mode="mostrecent")
        _FAMILIES[name] = family
    return family


class KvttlMetrics:
    """One cache's series, updated from the kit's counters when they change."""

    def __init__(self, labels: dict):
        names = tuple(labels)
        values = {k: str(v) for k, v in labels.items()}
        self.counters = {
            event: _family("counter", f"sglang:kvttl_leases_{event}", f"kvttl leases {event}", names).labels(**values)
            for event in LEASE_EVENTS}
        self.counters.update({
            name: _family("counter", f"sglang:kvttl_{name}", f"kvttl host tier: {name.replace('_', ' ')}",
                          names).labels(**values)
            for name in BYTE_COUNTERS})
        self.counters.update({
            name: _family("counter", f"sglang:kvttl_{name}", "kvttl: calls into the policy's own code that failed "
                          "(skipped)", names).labels(**values)
            for name in POLICY_COUNTERS})
        self.gauges = {
            name: _family("gauge", f"sglang:kvttl_{name}", f"kvttl: {name.replace('_', ' ')} now", names).labels(**values)
            for name in LEASE_GAUGES}
        self._reporter = StatsReporter()

    def publish(self, kit, byte_stats: dict, host_blocks: int) -> None:
        """Cheap when nothing changed (a few integers compared)."""
        data = self._reporter.report(kit, byte_stats, host_blocks)
        if data is None:
            return
        for name, counter in self.counters.items():
            if data.get(name):
                counter.inc(data[name])
        for name, gauge in self.gauges.items():
            gauge.set(data[name])
