"""Fleets in the simulator (issue #14 item 1): N = 1..16 replicas at a fixed load per replica.

    python benchmarks/bench_fleet_sim.py --json out/bench_fleet_sim.json

For each fleet size N, the same workload generator gives N x --programs-per-replica
programs at N x --jps-per-replica jobs per second, and each pairing of a
policy with a router replays them (``kvttl.sim.fleet.Fleet``): stock behind
round robin and behind session routing (what users run today), kvttl behind
session routing, lease-aware routing and round robin. Reported per run: mean
and p95 JCT, prefix hit rate, host reload rate, turns that changed replica,
and the wall time of the run (how the simulation's cost grows with N).
Targets, at 8 replicas: kvttl behind session or lease-aware routing >= 1.5x
lower mean JCT than stock behind round robin, and >= 1.2x lower than stock
behind session routing. Deterministic (seeded): the numbers are the
simulator's; only wall_s is the machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvttl.policy import get_policy
from kvttl.sim.cost import get_preset
from kvttl.sim.engine import EngineConfig
from kvttl.sim.fleet import Fleet
from kvttl.sim.workload import generate, get_workload

PAIRS = (("vllm", "round-robin"), ("vllm", "session"), ("kvttl", "round-robin"), ("kvttl", "session"),
         ("kvttl", "lease-aware"))
TARGET_N = 8


def run(args, n: int, policy: str, router: str) -> dict:
    cost = get_preset(args.preset)
    engine = EngineConfig()
    programs = generate(get_workload(args.workload), n * args.programs_per_replica, n * args.jps_per_replica,
                        seed=args.seed)
    blocks = cost.num_gpu_blocks(engine.block_size)
    reload = cost.reload_model(engine.max_num_batched_tokens)
    started = time.perf_counter()
    fleet = Fleet(programs, lambda: get_policy(policy, capacity_blocks=blocks, reload=reload), cost, engine,
                  replicas=n, router=router, jps=n * args.jps_per_replica)
    summary = fleet.run().summary()
    return {"replicas": n, "policy": policy, "router": router, "mean_jct_s": summary["mean_jct_s"],
            "p95_jct_s": summary["p95_jct_s"], "prefix_hit_rate": summary["prefix_hit_rate"],
            "host_reload_rate": summary["host_reload_rate"], "leases_granted": summary["leases_granted"],
            "leases_hit": summary["leases_hit"], "moves": fleet.moves, "num_programs": len(programs),
            "wall_s": time.perf_counter() - started}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--replicas", default="1,2,4,8,16", help="comma-separated fleet sizes")
    ap.add_argument("--workload", default="swe-bench")
    ap.add_argument("--preset", default="llama-3.1-8b-h100")
    ap.add_argument("--jps-per-replica", type=float, default=0.2)
    ap.add_argument("--programs-per-replica", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.replicas.split(",")]
    rows = []
    for n in sizes:
        for policy, router in PAIRS:
            row = run(args, n, policy, router)
            rows.append(row)
            print(f"N={n:2d} {policy:6s} {router:12s} mean JCT {row['mean_jct_s']:7.1f} s  p95 {row['p95_jct_s']:7.1f}"
                  f"  hit {row['prefix_hit_rate']:.2f}  host {row['host_reload_rate']:.2f}  moves {row['moves']:5d}"
                  f"  ({row['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    out = {"runs": rows, "config": vars(args), "targets": {}}
    if TARGET_N in sizes:
        at = {(r["policy"], r["router"]): r["mean_jct_s"] for r in rows if r["replicas"] == TARGET_N}
        for router in ("session", "lease-aware"):  # each kvttl pairing judged on its own
            mine = at[("kvttl", router)]
            vs_rr, vs_session = at[("vllm", "round-robin")] / mine, at[("vllm", "session")] / mine
            out["targets"][f"kvttl_{router}"] = {
                "vs_stock_round_robin": vs_rr, "met_1_5x_vs_round_robin": vs_rr >= 1.5,
                "vs_stock_session": vs_session, "met_1_2x_vs_session": vs_session >= 1.2}
    print(json.dumps(out["targets"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
