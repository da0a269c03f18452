"""The simulator: replays agent workloads on a modelled engine that drives
kvttl's real core and policies. ``kvttl simulate`` is its command line."""

from kvttl.sim.cost import PRESETS, CostModel, GpuSpec, ModelSpec, get_preset
from kvttl.sim.engine import EngineConfig, RunResult, Simulator
from kvttl.sim.workload import (
    WORKLOADS,
    Program,
    ToolSpec,
    Turn,
    WorkloadSpec,
    generate,
    get_workload,
    load_trace,
    load_workload_spec,
    replay_future,
)

__all__ = [
    "PRESETS", "CostModel", "GpuSpec", "ModelSpec", "get_preset",
    "EngineConfig", "RunResult", "Simulator",
    "WORKLOADS", "Program", "ToolSpec", "Turn", "WorkloadSpec", "generate", "get_workload", "load_trace",
    "load_workload_spec", "replay_future",
]
