"""benchmarks/bench_sglang_agents.py runs on SGLang's classes and means what it says
(virtual time: deterministic, so these are checks of the mechanism, not timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tests.adapters.sglang.harness  # noqa: F401  (skips where SGLang is not installed, as the other SGLang tests)

ROOT = Path(__file__).resolve().parents[3]


def test_bench_sglang_agents_runs_and_reports_what_kvttl_kept(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_sglang_agents

    out = tmp_path / "bench.json"
    bench_sglang_agents.main(["--repeats", "1", "--programs", "3", "--turns", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert set(modes) == {"stock", "kvttl", "kvttl+host", "continuum"}
    assert modes["stock"]["leases_granted"] == 0 and modes["stock"]["returning_context_lost"] > 0.5
    assert modes["kvttl+host"]["reloaded_bytes"] > 0
    assert modes["kvttl+host"]["returning_context_lost"] < modes["stock"]["returning_context_lost"] / 2
    assert report["kvttl+host_jct_speedup"] > 1.0  # the same workload, less prefill on the same modelled engine
