"""Agents on SGLang's own scheduling classes, stock radix cache against kvttl's.

    python benchmarks/bench_sglang_agents.py --json out/bench_sglang_agents.json

A full SGLang server needs a GPU, so this drives what runs on the CPU: SGLang
0.5.23's real ``UnifiedRadixCache`` (or kvttl's ``KvttlRadixCache``), its
token pool and allocator, ``match_kv_cache``, ``alloc_token_slots`` (which
evicts through the tree), ``release_kv_cache`` and ``SchedulePolicy`` with
kvttl's hook -- the same calls SGLang's scheduler makes, through the test
harness's driver -- inside a modelled engine loop: no model runs, and time is
virtual. Each step admits waiting requests in the policy's order while they
fit (SGLang's prefill adder stops at the first that does not), then charges
``prefill tokens / --prefill-tokens-per-s`` (+ host copies, both ways, at
``--host-tokens-per-s``: they run on the scheduler thread) + ``--decode-step-s``. What is measured on SGLang's
classes: which tokens the tree still holds, which it evicts, what kvttl pins,
revokes, offloads and reloads. What is modelled: the time those tokens cost.

The workload is bench_vllm_agents.py's shape in units of P, the prefill of one
--context prompt: --programs programs of --turns turns (each prompt the
previous context plus --new-tokens, --output tokens out), tool calls of
--tool-prefills x P on average (exponential), programs --stagger-prefills x P
apart, and single-turn background prompts (no program id) at
--background-load per P, over a --pool-tokens pool. Each mode replays the
same seeded workloads (--repeats seeds); ratios are medians over seeds.
Reported: mean and longest JCT, the share of returning turns' context computed
again (prefill the tree lost), background latency, leases and their hits,
host bytes, and the wall time spent in the cache calls.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "stock": None,
    "kvttl": {"policy": "kvttl"},
    "kvttl+host": {"policy": "kvttl", "host_tier_blocks": 16384},
    "continuum": {"policy": "continuum"},
}


def _workload(args, seed: int) -> list[tuple[float, str, int]]:
    """(arrival, kind, index) of every first turn and background prompt."""
    rng = random.Random(seed)
    p = args.context / args.prefill_tokens_per_s
    events = [(i * args.stagger_prefills * p, "program", i) for i in range(args.programs)]
    horizon = (args.programs * args.stagger_prefills + args.turns * (args.tool_prefills + 2)) * p
    t, i = 0.0, 0
    while args.background_load > 0:
        t += rng.expovariate(args.background_load / p)
        if t > horizon:
            break
        events.append((t, "background", i))
        i += 1
    return events


class _Batch:
    """What kvttl's scheduling hook asks of SGLang's running batch: whether anything runs."""

    def __init__(self, running):
        self.running = running

    def is_empty(self) -> bool:
        return not self.running


def run_mode(args, mode: str, seed: int) -> dict:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin
    from tests.adapters.sglang.harness import FakeClock, Turn, make_cache, make_kv_hints, tokens

    plugin.register()
    # SGLang logs a traceback for the idle hook's target (its Scheduler module needs a GPU install to import)
    logging.getLogger("sglang.srt.plugins.hook_registry").setLevel(logging.CRITICAL)
    HookRegistry.apply_hooks()
    clock = FakeClock(0.0)
    config = MODES[mode]
    cache = make_cache("stock" if config is None else "kvttl", tokens=args.pool_tokens, rows=64, clock=clock,
                       config=config, queue_clock=clock)  # queue entries are stamped in virtual time too
    policy = SchedulePolicy("fcfs", cache, False, False, False)
    rng = random.Random(seed + 1)
    p = args.context / args.prefill_tokens_per_s
    events = [(t, kind, i, 0) for t, kind, i in _workload(args, seed)]
    heapq.heapify(events)
    waiting, running = [], []  # Turn objects; running: [turn, tokens still to decode]
    started, context, arrived_at = {}, {}, {}
    jct, background, lost, returning = [], [], 0, 0  # lost / returning: tokens of previous contexts
    cache_s = 0.0

    def timed(fn, *a):
        nonlocal cache_s
        t0 = time.perf_counter()
        out = fn(*a)
        cache_s += time.perf_counter() - t0
        return out

    host_copied = 0  # pages copied to or from the host so far
    while events or waiting or running:
        while events and events[0][0] <= clock.t:
            at, kind, i, turn_index = heapq.heappop(events)
            if kind == "program":
                prompt = context.get(i, tokens(1 + i, args.context)) + (
                    tokens(1000 + 97 * i + turn_index, args.new_tokens) if turn_index else [])
                last = turn_index == args.turns - 1
                hints = make_kv_hints(f"agent-{i}", tool="bash", last_turn=last)
                turn = Turn(cache, prompt, args.output, hints=hints, entered=clock.t)
                started.setdefault(i, at)
            else:
                turn = Turn(cache, tokens(50_000 + i, args.context), args.output, entered=clock.t)
            turn.meta = (kind, i, turn_index, at)
            timed(turn.arrive)
            waiting.append(turn)
        prefill = 0
        if waiting:
            queue = [t.req for t in waiting]
            timed(policy.calc_priority, queue, _Batch(running))
            order = {id(r): k for k, r in enumerate(queue)}
            waiting.sort(key=lambda t: order[id(t.req)])
            while waiting and len(running) < args.max_running:
                turn = waiting[0]
                timed(turn.arrive)  # the match the prefill adder makes (and kvttl's host reload)
                need = len(turn.req.origin_input_ids) + args.output - turn.prefix_len
                free = cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size()
                if need > free:
                    break
                waiting.pop(0)
                kind, i, turn_index, at = turn.meta
                if kind == "program" and turn_index:
                    returning += len(context[i])
                    lost += len(context[i]) - min(turn.prefix_len, len(context[i]))
                timed(turn.admit)
                prefill += len(turn.req.origin_input_ids) - turn.prefix_len
                running.append([turn, args.output])
        host = getattr(cache, "host", None)
        if host is not None:  # copies both ways run on the scheduler thread: each step pays for its own
            copied = (host.stats["reloaded_bytes"] + host.stats["offloaded_bytes"]) // host.copier.slot_bytes
            step_copies, host_copied = copied - host_copied, copied
        else:
            step_copies = 0
        if not running:
            if not events:
                raise RuntimeError(f"{mode}: {len(waiting)} requests wait and nothing runs or arrives")
            clock.t = events[0][0]
            if hasattr(cache, "on_idle"):
                timed(cache.tick)
            continue
        clock.t += prefill / args.prefill_tokens_per_s + step_copies / args.host_tokens_per_s + args.decode_step_s
        for entry in list(running):
            entry[1] -= 1
            if entry[1] > 0:
                continue
            running.remove(entry)
            turn = entry[0]
            timed(turn.finish)
            kind, i, turn_index, at = turn.meta
            if kind == "background":
                background.append(clock.t - at)
            elif turn_index == args.turns - 1:
                jct.append(clock.t - started[i])
            else:
                context[i] = turn.context
                tool_s = rng.expovariate(1.0 / (args.tool_prefills * p))
                heapq.heappush(events, (clock.t + tool_s, "program", i, turn_index + 1))
    stats = dict(getattr(cache, "stats", {}))
    if hasattr(cache, "release_all_leases"):
        cache.release_all_leases()
    assert cache.protected_size() == 0, "a lock leaked"
    jct.sort()
    return {
        "mean_jct_s": statistics.fmean(jct), "max_jct_s": jct[-1],  # a few programs: no p95
        "mean_jct_p": statistics.fmean(jct) / p,
        "background_mean_s": statistics.fmean(background) if background else 0.0,
        "returning_context_lost": lost / max(1, returning),
        "leases_granted": stats.get("granted", 0), "leases_hit": stats.get("hit", 0),
        "offloaded_bytes": stats.get("offloaded_bytes", 0), "reloaded_bytes": stats.get("reloaded_bytes", 0),
        "cache_calls_wall_s": cache_s, "simulated_s": clock.t,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--programs", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context", type=int, default=2000, help="tokens in a program's first prompt")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--tool-prefills", type=float, default=3.0, help="mean tool call = this x P")
    ap.add_argument("--stagger-prefills", type=float, default=1.0, help="program starts this x P apart")
    ap.add_argument("--background-load", type=float, default=0.6, help="background prompts per P")
    ap.add_argument("--pool-tokens", type=int, default=5120, help="the KV pool (bench_vllm_agents: 40 x 128)")
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--prefill-tokens-per-s", type=float, default=10000.0,
                    help="modelled prefill rate (the kit's reload_tokens_per_s prior, so the policy's model matches)")
    ap.add_argument("--host-tokens-per-s", type=float, default=100000.0, help="modelled host copy rate (each way)")
    ap.add_argument("--decode-step-s", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=5, help="seeds")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown or "stock" not in modes:
        ap.error(f"--modes must include stock and name only {', '.join(MODES)}; got {args.modes}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {m: [] for m in modes}
    for seed in range(args.repeats):
        for m in modes:
            runs[m].append(run_mode(args, m, seed))
            r = runs[m][-1]
            print(f"seed {seed} {m:11s} mean JCT {r['mean_jct_s']:7.2f} s  lost {r['returning_context_lost']:.0%}  "
                  f"background {r['background_mean_s']:.2f} s  leases {r['leases_granted']}/{r['leases_hit']} hit",
                  file=sys.stderr, flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    out = {"modes": med, "config": vars(args)}
    for m in modes:
        if m == "stock":
            continue
        out[f"{m}_jct_speedup"] = statistics.median(s["mean_jct_s"] / r["mean_jct_s"]
                                                    for s, r in zip(runs["stock"], runs[m]))
        out[f"{m}_background_latency_ratio"] = statistics.median(
            r["background_mean_s"] / s["background_mean_s"] for s, r in zip(runs["stock"], runs[m])
            if s["background_mean_s"])
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
