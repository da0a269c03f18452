"""kvttl's counters in vLLM's metrics: the periodic "KV Transfer metrics" log
line and the Prometheus registry (``/metrics``, ``LLM.get_metrics()``).

Names and meanings are the kit's (``kvttl.kit.metrics``), under ``vllm:``:
``vllm:kvttl_leases_<event>_total``, ``vllm:kvttl_<name>_total`` for host-tier
bytes and the policy's failures, and the gauges ``vllm:kvttl_leases``, ``vllm:kvttl_pinned_blocks``,
``vllm:kvttl_host_blocks``.
"""

from __future__ import annotations

from kvttl.kit import LEASE_EVENTS
from kvttl.kit.metrics import BYTE_COUNTERS, COUNTERS, LEASE_GAUGES, POLICY_COUNTERS
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

__all__ = ["KvttlConnectorStats", "KvttlPromMetrics", "LEASE_EVENTS", "BYTE_COUNTERS", "COUNTERS", "LEASE_GAUGES"]

class KvttlConnectorStats(KVConnectorStats):
    """One report: counter increments since the previous report, and the
    latest gauge values. vLLM aggregates reports between log intervals."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in COUNTERS:
            if key in other.data:
                self.data[key] = self.data.get(key, 0) + other.data[key]
        for key in LEASE_GAUGES:
            if key in other.data:
                self.data[key] = other.data[key]
        return self

    def reduce(self) -> dict[str, int | float]:
        return {f"kvttl_{k}": v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not self.data


class KvttlPromMetrics(KVConnectorPromMetrics):
    """kvttl's counters and gauges next to vLLM's own, one child per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            event: create_metric_per_engine(self._counter_cls(
                name=f"vllm:kvttl_leases_{event}", documentation=f"kvttl leases {event}", labelnames=labelnames),
                per_engine_labelvalues)
            for event in LEASE_EVENTS}
        self.counters.update({
            name: create_metric_per_engine(self._counter_cls(
                name=f"vllm:kvttl_{name}", documentation=f"kvttl host tier: {name.replace('_', ' ')}",
                labelnames=labelnames), per_engine_labelvalues)
            for name in BYTE_COUNTERS})
        self.counters.update({
            name: create_metric_per_engine(self._counter_cls(
                name=f"vllm:kvttl_{name}", documentation="kvttl: calls into the policy's own code that failed "
                "(skipped)", labelnames=labelnames), per_engine_labelvalues)
            for name in POLICY_COUNTERS})
        self.gauges = {
            name: create_metric_per_engine(self._gauge_cls(
                name=f"vllm:kvttl_{name}", documentation=f"kvttl: {name.replace('_', ' ')} now",
                labelnames=labelnames, multiprocess_mode="mostrecent"), per_engine_labelvalues)
            for name in LEASE_GAUGES}

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0):
        for event, metric in self.counters.items():
            if transfer_stats_data.get(event):
                metric[engine_idx].inc(transfer_stats_data[event])
        for name, metric in self.gauges.items():
            if name in transfer_stats_data:
                metric[engine_idx].set(transfer_stats_data[name])
