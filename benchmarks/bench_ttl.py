"""What a TTL decision costs the engine, per finished turn.

    python benchmarks/bench_ttl.py --json out/bench_ttl.json

Every finished non-final turn costs the engine one ``ttl(turn)`` call, and
every returning turn one ``on_tool_return``; the engine kit makes both
inside the engine's step. This times the pair, in steady state: the
estimator's windows full (``--warm`` returns first, spread over ``--tools``
tools), then ``--iters`` rounds of one return and one decision, each with a
fresh duration, so no estimate is reused from a cache. Durations are
exponential (mean 3 s), continuous as tool timings are. Median over
``--repeats``, in microseconds, per learning policy.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

from kvttl.policy import get_policy
from kvttl.policy.ttl import TurnContext

POLICIES = ("continuum", "kvttl")


def decision_us(policy: str, *, tools: int, warm: int, iters: int, seed: int) -> float:
    ttl = get_policy(policy).ttl
    rng = random.Random(seed)
    for i in range(warm):
        ttl.on_tool_return(f"tool{i % tools}", rng.expovariate(1 / 3))
    turns = [TurnContext(program_id=i, tool=f"tool{i % tools}", turn_index=1, num_tokens=20000, num_blocks=1250,
                         prefill_s=1.0) for i in range(iters)]
    durations = [rng.expovariate(1 / 3) for _ in range(iters)]
    start = time.perf_counter()
    for turn, duration in zip(turns, durations):
        ttl.on_tool_return(turn.tool, duration)
        ttl.ttl(turn)
    return (time.perf_counter() - start) / iters * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--tools", type=int, default=10)
    ap.add_argument("--warm", type=int, default=20000, help="returns before timing (windows hold 1024 each)")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for name, value in (("tools", args.tools), ("iters", args.iters), ("repeats", args.repeats)):
        if value < 1:
            ap.error(f"--{name} must be at least 1, got {value}")
    if args.warm < 0:
        ap.error(f"--warm must be >= 0, got {args.warm}")
    result = {"unit": "microseconds per on_tool_return + ttl", "config": {k: v for k, v in vars(args).items()
                                                                        if k != "json"},
              "python": sys.version.split()[0], "machine": platform.machine()}
    for policy in POLICIES:
        runs = [decision_us(policy, tools=args.tools, warm=args.warm, iters=args.iters, seed=r)
                for r in range(args.repeats)]
        result[policy] = {"median_us": statistics.median(runs), "runs_us": runs}
        print(f"{policy:10s} {statistics.median(runs):7.1f} us per return + decision", flush=True)
    result["kvttl_over_continuum"] = result["kvttl"]["median_us"] / result["continuum"]["median_us"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
