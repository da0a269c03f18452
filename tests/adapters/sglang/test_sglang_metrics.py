"""kvttl's counters in SGLang's Prometheus metrics (issue #15 item 2), on
SGLang 0.5.23's own cache classes with its metrics collector on."""

from __future__ import annotations

from tests.adapters.sglang.harness import FakeClock, make_cache, tokens
from tests.adapters.sglang.test_sglang_host import HOST, _agent_turn, _back, _no_leak, _pressure


def _sample(name, labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {k: str(v) for k, v in labels.items()})


def test_kvttl_counters_are_in_sglangs_prometheus_metrics_with_vllms_names():
    """Issue #15 item 2: with --enable-metrics SGLang exported nothing of kvttl's."""
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock, config=HOST, metrics=True)
    labels = cache.metrics_collector.labels  # SGLang's own radix-cache labels (tp_rank, ...)
    first = _agent_turn(cache, tokens(1, 40), program_id="A", ttl="10s")
    assert _sample("sglang:kvttl_leases_granted_total", labels) == 1
    assert _sample("sglang:kvttl_leases", labels) == 1
    assert _sample("sglang:kvttl_pinned_blocks", labels) == 48
    clock.t += 10.5
    _pressure(cache, range(2, 8))
    back = _back(cache, first, "A", ttl="10s")
    assert _sample("sglang:kvttl_leases_expired_total", labels) == 1
    assert _sample("sglang:kvttl_leases", labels) == 0
    slot = cache.host.copier.slot_bytes
    assert _sample("sglang:kvttl_offloaded_bytes_total", labels) == 48 * slot
    assert _sample("sglang:kvttl_reloaded_bytes_total", labels) == 48 * slot
    assert _sample("sglang:kvttl_host_blocks", labels) == 48
    back.admit().finish()
    _no_leak(cache)
    from kvttl.kit.metrics import COUNTERS, LEASE_GAUGES

    for name in COUNTERS:  # every counter the vLLM adapter exports, under the same name
        series = f"sglang:kvttl_leases_{name}_total" if name in cache.kit.stats else f"sglang:kvttl_{name}_total"
        assert _sample(series, labels) is not None, series
    for name in LEASE_GAUGES:
        assert _sample(f"sglang:kvttl_{name}", labels) is not None, name
    # a flush (SGLang's flush_cache) brings the gauges to zero at once, not at the next lease event
    _agent_turn(cache, tokens(5, 40), program_id="F", ttl="60s")
    assert _sample("sglang:kvttl_leases", labels) == 1
    cache.reset()
    assert _sample("sglang:kvttl_leases", labels) == 0 and _sample("sglang:kvttl_pinned_blocks", labels) == 0
