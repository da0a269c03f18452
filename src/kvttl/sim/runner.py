"""Policy x load sweeps: the work behind ``kvttl simulate``."""

from __future__ import annotations

import functools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import attrs
import numpy as np

from kvttl.errors import BadArgumentError
from kvttl.policy import DEFAULT_POLICIES, get_policy, import_policy_modules
from kvttl.sim.cost import get_preset
from kvttl.sim.engine import EngineConfig, Simulator
from kvttl.sim.fleet import ROUTERS, Fleet
from kvttl.sim.workload import PartialArrivalTimes, generate, get_workload, load_trace, replay_future

__all__ = ["SweepConfig", "run_sweep", "format_tables", "write_plot", "write_json", "DEFAULT_JPS", "TURN_BUCKETS"]

#: Loads from light to saturated for the 8B / H100 preset (jobs per second).
DEFAULT_JPS = {"swe-bench": (0.05, 0.1, 0.2, 0.4), "bfcl": (0.5, 1.0, 2.0, 4.0)}
#: The most programs one run may replay (memory grows with them).
MAX_PROGRAMS = 1_000_000
#: Programs grouped by their number of turns, for the gain-vs-turns table.
#: The last bucket is open: programs of any length above it.
TURN_BUCKETS = ((1, 5), (6, 10), (11, 15), (16, None))
#: Policies that are bounds, not choices: shown, never named "best".
BOUNDS = ("oracle",)
#: Mean JCTs within this factor of each other are a tie.
TIE = 1.01
#: The "load" of a run that replays a trace's own arrival times (Mooncake timestamps).
TRACE_TIMES = 0.0


def load_text(jps: float) -> str:
    return "trace times" if jps == TRACE_TIMES else f"{jps:g} jps"


@functools.lru_cache(maxsize=8)
def _trace_has_times(path: str, mtime: float, max_programs: int) -> bool:
    try:
        load_trace(path, max_programs=max_programs)
    except PartialArrivalTimes:
        raise  # some times, not all: say so, rather than replay none of them
    except BadArgumentError:
        return False
    return True


@attrs.frozen(kw_only=True)
class SweepConfig:
    workload: str = "swe-bench"
    trace: str | None = None
    preset: str = "llama-3.1-8b-h100"
    policies: tuple[str, ...] = tuple(DEFAULT_POLICIES)
    jps: tuple[float, ...] | None = None
    num_programs: int = 60
    seed: int = 0
    host_tier_gb: float = 256.0
    num_gpu_blocks: int | None = None
    workers: int = 0  # 0: min(2, cpu count)
    #: engine replicas behind one router (kvttl.sim.fleet); the loads are the fleet's
    replicas: int = 1
    router: str = "session"
    #: modules to import first (in every worker too), which register policies of their own
    policy_modules: tuple[str, ...] = ()

    def loads(self) -> tuple[float, ...]:
        if self.jps:
            return self.jps
        if self.trace is not None and os.path.exists(self.trace) and \
                _trace_has_times(self.trace, os.path.getmtime(self.trace), self.num_programs):
            return (TRACE_TIMES,)  # a trace with arrival times replays them
        name = self.workload
        if name not in DEFAULT_JPS and self.trace is None:
            name = get_workload(name).base or name  # a spec file sweeps the loads of its base
        return DEFAULT_JPS.get(name, DEFAULT_JPS["swe-bench"])

    def validate(self) -> None:
        """Fails fast, before any worker starts, on anything malformed: the
        flags, the preset, the workload spec and every row of a trace."""
        import_policy_modules(self.policy_modules, source="--import")
        get_preset(self.preset)
        if not self.policies:
            raise BadArgumentError("no policies to compare")
        for name in self.policies:
            get_policy(name, future=replay_future([]))
        twice = sorted({name for name in self.policies if self.policies.count(name) > 1})
        if twice:
            raise BadArgumentError(f"policies: {', '.join(twice)} given more than once")
        for x in self.jps or ():
            if not (x > 0 and np.isfinite(x)):
                raise BadArgumentError(f"loads must be positive jobs per second, got {x!r}")
        again = sorted({f"{x:g}" for x in self.jps or () if list(self.jps).count(x) > 1})
        if again:
            raise BadArgumentError(f"loads: {', '.join(again)} given more than once")
        if not 1 <= self.num_programs <= MAX_PROGRAMS:
            raise BadArgumentError(f"programs must be between 1 and {MAX_PROGRAMS}, got {self.num_programs}")
        if not 0 <= self.seed < 2**63:
            raise BadArgumentError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if not (self.host_tier_gb >= 0 and np.isfinite(self.host_tier_gb)):
            raise BadArgumentError(f"host tier size must be a finite number >= 0 GB, got {self.host_tier_gb}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise BadArgumentError(f"gpu blocks must be >= 1 (leave it out for the preset's), got {self.num_gpu_blocks}")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or not 1 <= self.replicas <= 1024:
            raise BadArgumentError(f"replicas must be an integer from 1 to 1024, got {self.replicas!r}")
        if self.router not in ROUTERS:
            raise BadArgumentError(f"unknown router {self.router!r}; known: {', '.join(ROUTERS)}")
        if self.workers < 0:
            raise BadArgumentError(f"workers must be >= 0 (0: min(2, cores)), got {self.workers}")
        if self.trace is None:
            get_workload(self.workload)
        else:
            first = self.loads()[0]
            load_trace(self.trace, jps=None if first == TRACE_TIMES else first, seed=self.seed,
                       max_programs=self.num_programs)


def _programs(cfg: SweepConfig, jps: float):
    if cfg.trace:
        return load_trace(cfg.trace, jps=None if jps == TRACE_TIMES else jps, seed=cfg.seed,
                          max_programs=cfg.num_programs)
    return generate(get_workload(cfg.workload), cfg.num_programs, jps, seed=cfg.seed)


def _run_one(args) -> dict:
    cfg, policy_name, jps = args
    import_policy_modules(cfg.policy_modules, source="--import")  # a worker process may start without them
    cost = get_preset(cfg.preset)
    engine = EngineConfig(host_tier_gb=cfg.host_tier_gb, num_gpu_blocks=cfg.num_gpu_blocks)
    blocks = cfg.num_gpu_blocks or cost.num_gpu_blocks(engine.block_size)
    programs = _programs(cfg, jps)
    future = replay_future(programs)

    def policy():
        return get_policy(policy_name, capacity_blocks=blocks, reload=cost.reload_model(engine.max_num_batched_tokens),
                          future=future)

    if cfg.replicas > 1:
        result = Fleet(programs, policy, cost, engine, replicas=cfg.replicas, router=cfg.router, jps=jps).run()
    else:
        result = Simulator(programs, policy(), cost, engine, jps=jps).run()
    summary = result.summary()
    summary["policy"] = policy_name
    summary["jct_s"] = result.jct_s.tolist()
    summary["turns"] = result.turns.tolist()
    return summary


def run_sweep(cfg: SweepConfig, *, progress: bool | str = True) -> dict:
    """Every policy at every load; returns ``{"results": [...], "by_turns": [...], "config": {...}}``.
    ``progress``: True or "bar" draws a bar; "lines" prints a line per
    finished run to stderr (for a log or a pipe); False is silent."""
    cfg.validate()
    tasks = [(cfg, p, j) for j in cfg.loads() for p in cfg.policies]
    workers = cfg.workers or min(2, os.cpu_count() or 1)
    bar = None
    if progress is True or progress == "bar":
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="simulating", unit="run", leave=False)
    rows = []

    def done(row):
        rows.append(row)
        if bar:
            bar.update()
        elif progress == "lines":
            print(f"[{len(rows)}/{len(tasks)}] {row['policy']} at {load_text(row['jps'])}: "
                  f"mean JCT {row['mean_jct_s']:.1f} s", file=sys.stderr, flush=True)

    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(_run_one, tasks):
                done(row)
    else:
        for t in tasks:
            done(_run_one(t))
    if bar:
        bar.close()
    baseline = cfg.policies[0]
    by_turns = []
    for jps in cfg.loads():
        at = {r["policy"]: r for r in rows if r["jps"] == jps}
        base = at[baseline]
        for r in at.values():
            r["jct_speedup_vs_" + baseline.replace("-", "_")] = base["mean_jct_s"] / r["mean_jct_s"]
        turns = np.array(base["turns"])
        for lo, hi in TURN_BUCKETS:
            mask = (turns >= lo) & (turns <= (np.inf if hi is None else hi))
            if not mask.any():
                continue
            base_mean = float(np.mean(np.array(base["jct_s"])[mask]))
            for name, r in at.items():
                by_turns.append({"jps": jps, "policy": name, "turns": f"{lo}+" if hi is None else f"{lo}-{hi}",
                                 "num_programs": int(mask.sum()),
                                 "mean_jct_s": float(np.mean(np.array(r["jct_s"])[mask])),
                                 "speedup_vs_baseline": base_mean / float(np.mean(np.array(r["jct_s"])[mask]))})
    # a trace may hold fewer programs than asked for: what ran, beside what was asked
    ran = rows[0]["num_programs"] if rows else cfg.num_programs
    return {"results": rows, "by_turns": by_turns, "config": {**attrs.asdict(cfg), "loads": list(cfg.loads()),
                                                               "baseline": baseline, "programs_run": ran}}


#: a policy that re-prefilled this share of its prompt tokens because the host
#: tier could not keep them is named under the table, with the flag that sizes the tier
HOST_LOST_NOTED = 0.01


def format_tables(report: dict) -> str:
    cfg = report["config"]
    baseline = cfg["baseline"]
    key = "jct_speedup_vs_" + baseline.replace("-", "_")
    lines = []
    source = cfg["trace"] or cfg["workload"]
    run = cfg.get("programs_run", cfg["num_programs"])
    lines.append(f"kvttl simulate: {source}, {run} programs, preset {cfg['preset']}, "
                 f"host tier {cfg['host_tier_gb']:g} GB, seed {cfg['seed']}"
                 + (f", {cfg['replicas']} replicas behind a {cfg['router']} router (loads are the fleet's)"
                    if cfg.get("replicas", 1) > 1 else ""))
    versus = max(10, len("vs " + baseline))  # a long baseline name widens its column, not the next ones
    header = (f"{'jps':>6} {'policy':<18} {'mean JCT s':>10} {'p50':>8} {'p95':>8} {'vs ' + baseline:>{versus}} "
              f"{'jobs/s':>7} {'hit':>6} {'host':>6} {'queue s':>8} {'leases g/hit/exp/rev':>22} {'preempt':>7}")
    lines.append(header)
    lines.append("-" * len(header))
    for jps in cfg["loads"]:
        rows = [r for r in report["results"] if r["jps"] == jps]
        for r in rows:
            leases = f"{r['leases_granted']}/{r['leases_hit']}/{r['leases_expired']}/{r['leases_revoked']}"
            lines.append(
                f"{'trace' if jps == TRACE_TIMES else format(jps, 'g'):>6} {r['policy']:<18} {r['mean_jct_s']:>10.1f} {r['p50_jct_s']:>8.1f} {r['p95_jct_s']:>8.1f} "
                f"{r[key]:>{versus - 1}.2f}x {r['throughput_jobs_per_s']:>7.3f} {r['prefix_hit_rate']:>6.1%} "
                f"{r['host_reload_rate']:>6.1%} {r['mean_queue_delay_s']:>8.2f} {leases:>22} {r['preemptions']:>7}")
        bound = next((r for r in rows if r["policy"] in BOUNDS), None)
        rows = [r for r in rows if r["policy"] not in BOUNDS] or rows
        best = min(rows, key=lambda r: r["mean_jct_s"])
        worst = max(r["mean_jct_s"] for r in rows)
        ahead = [r["policy"] for r in rows if r["mean_jct_s"] <= best["mean_jct_s"] * TIE]
        if len(rows) == 1:
            pass  # one policy to choose: nothing to rank, and no tie
        elif worst <= best["mean_jct_s"] * TIE:
            lines.append(f"{'':>6} at {load_text(jps)} every policy is within 1% of the others: a tie (the KV "
                         "cache is not under pressure here, or the workload gives pins nothing to save)")
        elif len(ahead) > 1:
            lines.append(f"{'':>6} best at {load_text(jps)}: a tie within 1% between {', '.join(ahead)} "
                         f"({best[key]:.2f}x vs {baseline})")
        else:
            lines.append(f"{'':>6} best at {load_text(jps)}: {best['policy']} ({best[key]:.2f}x vs {baseline})")
        if bound is not None and bound is not best:
            lines.append(f"{'':>6} {bound['policy']} (a clairvoyant bound on TTLs, not a choice): mean JCT "
                         f"{bound['mean_jct_s'] / best['mean_jct_s']:.2f}x {best['policy']}'s")
        lines.append("")
    full = [r for r in report["results"] if r.get("host_lost_rate", 0.0) >= HOST_LOST_NOTED]
    if full:
        worst = max(full, key=lambda r: r["host_lost_rate"])
        names = ", ".join(dict.fromkeys(r["policy"] for r in full))
        lines.append(f"The {cfg['host_tier_gb']:g} GB host tier was too small for {names}: it could not keep "
                     f"contexts until their next turn came back, which re-prefilled them ({worst['policy']} at "
                     f"{load_text(worst['jps'])}: {worst['host_lost_rate']:.1%} "
                     "of its prompt tokens). The ranking then depends on the tier's size: --host-gb sets it.")
        lines.append("")
    top = max(cfg["loads"])
    lines.append(f"Mean JCT speedup vs {baseline} by turns per program, at {load_text(top)}:")
    buckets = [b for b in report["by_turns"] if b["jps"] == top]
    names = list(dict.fromkeys(b["policy"] for b in buckets))
    spans = list(dict.fromkeys(b["turns"] for b in buckets))
    lines.append(f"  {'policy':<18}" + "".join(f"{s + ' turns':>13}" for s in spans))
    for name in names:
        cells = {b["turns"]: b for b in buckets if b["policy"] == name}
        lines.append(f"  {name:<18}" + "".join(f"{cells[s]['speedup_vs_baseline']:>12.2f}x" for s in spans))
    counts = {b["turns"]: b["num_programs"] for b in buckets}
    lines.append(f"  {'(programs)':<18}" + "".join(f"{counts[s]:>13}" for s in spans))
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """PNG: mean JCT against load per policy, and the JCT CDF at the highest load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadArgumentError("--plot needs matplotlib: pip install 'kvttl[plot]'") from None
    cfg = report["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if cfg["loads"] == [TRACE_TIMES]:  # a trace's own arrival times: one run per policy, no load axis
        rows = [next(r for r in report["results"] if r["policy"] == name) for name in cfg["policies"]]
        left.barh([r["policy"] for r in rows], [r["mean_jct_s"] for r in rows])
        left.invert_yaxis()
        left.set_xlabel("mean job completion time (s)")
        left.set_title("Mean JCT at the trace's arrival times")
    else:
        for name in cfg["policies"]:
            rows = sorted((r for r in report["results"] if r["policy"] == name), key=lambda r: r["jps"])
            left.plot([r["jps"] for r in rows], [r["mean_jct_s"] for r in rows], marker="o", label=name)
        left.set_xlabel("load (jobs per second)")
        left.set_ylabel("mean job completion time (s)")
        left.set_title("Mean JCT against load")
        left.legend(fontsize=8)
    left.grid(alpha=0.3)
    top = max(cfg["loads"])
    for r in (r for r in report["results"] if r["jps"] == top):
        jct = np.sort(r["jct_s"])
        right.step(jct, np.arange(1, len(jct) + 1) / len(jct), where="post", label=r["policy"])
    right.set_xlabel("job completion time (s)")
    right.set_ylabel("fraction of programs")
    right.set_title(f"JCT CDF at {load_text(top)}")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"{cfg['trace'] or cfg['workload']} on {cfg['preset']}, "
                 f"{cfg.get('programs_run', cfg['num_programs'])} programs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: dict, path: str) -> None:
    """The report, each result with its per-program JCTs (for CDFs) but not the turn counts."""
    slim = {**report, "results": [{k: v for k, v in r.items() if k != "turns"} for r in report["results"]]}
    with open(path, "w") as f:
        json.dump(slim, f, indent=1)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadArgumentError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise BadArgumentError(f"{what}: expected at least one number")
    return values


def check_output_path(path: str, what: str) -> None:
    """Fails now, not after the sweep, when ``path`` cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BadArgumentError(f"{what}: {path} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise BadArgumentError(f"{what}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadArgumentError(f"{what}: cannot write into {parent}")


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadArgumentError("--plot needs matplotlib: pip install 'kvttl[plot]'") from None


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())

