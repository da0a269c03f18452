"""The ``kvttl`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvttl.errors import BadArgumentError, KvttlError


def _simulate(args) -> int:
    from kvttl.policy import DEFAULT_POLICIES
    from kvttl.sim.runner import (SweepConfig, check_output_path, check_plot_available, format_tables, parse_floats,
                                  parse_names, run_sweep, write_json, write_plot)

    if args.trace is not None and args.workload is not None:
        raise BadArgumentError("give --workload or --trace, not both (a trace is the workload)")
    if args.router is not None and args.replicas == 1:
        raise BadArgumentError("--router routes between replicas: give --replicas 2 or more")
    if args.import_modules is not None and not parse_names(args.import_modules):
        raise BadArgumentError("--import: no module named (give mypkg.policies, or leave --import out)")
    if args.json:
        check_output_path(args.json, "--json")
    if args.plot:
        check_plot_available()
        check_output_path(args.plot, "--plot")
    cfg = SweepConfig(
        workload=args.workload or "swe-bench", trace=args.trace, preset=args.preset,
        policies=parse_names(args.policies) if args.policies is not None else tuple(DEFAULT_POLICIES),
        jps=parse_floats(args.jps, "--jps") if args.jps is not None else None,
        num_programs=args.programs, seed=args.seed, host_tier_gb=args.host_gb,
        num_gpu_blocks=args.gpu_blocks, workers=args.workers, replicas=args.replicas, router=args.router or "session",
        policy_modules=parse_names(args.import_modules) if args.import_modules is not None else (),
    )
    t0 = time.perf_counter()
    progress = False if args.quiet else ("bar" if sys.stderr.isatty() else "lines")
    report = run_sweep(cfg, progress=progress)
    report["config"]["wall_s"] = round(time.perf_counter() - t0, 2)
    if args.json:  # first: a finished sweep is kept whatever happens after
        write_json(report, args.json)
    print(format_tables(report))
    print(f"\n{len(report['results'])} runs in {report['config']['wall_s']:.1f} s")
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _info(args) -> int:
    import kvttl
    from kvttl.policy import policy_names
    from kvttl.sim import PRESETS, WORKLOADS

    print(json.dumps({"build": kvttl.build_info(), "cuda_probe": kvttl.cuda_probe(), "policies": policy_names(),
                      "presets": list(PRESETS), "workloads": list(WORKLOADS)}, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvttl", description="KV-cache leases with TTL for multi-turn agents")
    sub = parser.add_subparsers(dest="command")
    sim = sub.add_parser("simulate", help="compare scheduling policies on a simulated agent workload",
                         description="Replays an agent workload through kvttl's core and policies on a modelled "
                                     "engine, for every policy at every load, and prints a table.")
    sim.add_argument("--workload", help="swe-bench, bfcl, or a .toml/.json spec file (default swe-bench)")
    sim.add_argument("--trace", help="a TraceLab, Dynamo agentic-Mooncake or aiperf multi-turn JSONL trace instead "
                     "of a workload (Mooncake hash_ids, 512 tokens each, say which prompt blocks requests share)")
    sim.add_argument("--preset", default="llama-3.1-8b-h100",
                     help="llama-3.1-8b-h100, llama-3.1-8b-h200, llama-3.1-70b-4xh100, or a .json file")
    sim.add_argument("--policies", help="comma-separated; the first is the baseline (default: all)")
    sim.add_argument("--import", dest="import_modules", metavar="MODULES",
                     help="comma-separated modules to import first, which register policies of their own "
                          "(kvttl.policy.register_policy); they must be importable, e.g. on PYTHONPATH")
    sim.add_argument("--jps", help="comma-separated loads in jobs per second (default: light to saturated)")
    sim.add_argument("--programs", type=int, default=60, help="programs per run (default 60)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--host-gb", type=float, default=256.0,
                     help="pinned host DRAM for KV per engine (each replica has its own), used by offloading "
                          "policies (default 256; 0 for none); the output says when it was too small")
    sim.add_argument("--gpu-blocks", type=int, help="override the GPU block count the preset allows")
    sim.add_argument("--workers", type=int, default=0, help="processes (default: min(2, cores))")
    sim.add_argument("--replicas", type=int, default=1,
                     help="engine replicas behind one router; --jps is then the whole fleet's load (default 1)")
    sim.add_argument("--router",
                     help="with --replicas: round-robin, least-loaded, session (consistent hash on the program id) "
                          "or lease-aware (stay with the lease unless its queue is long) (default session)")
    sim.add_argument("--json", help="write results as JSON here")
    sim.add_argument("--plot", help="write a PNG: mean JCT against load, JCT CDF at the highest load")
    sim.add_argument("--quiet", action="store_true",
                     help="no progress (a bar on a terminal, else a line per finished run on stderr)")
    sim.set_defaults(func=_simulate)
    info = sub.add_parser("info", help="what this installation was built with, and what it knows")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KvttlError as e:
        print(f"kvttl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
