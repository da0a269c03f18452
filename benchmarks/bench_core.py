"""Core benchmark: per-block and per-lease costs, from Python, side by side with vLLM.

    python benchmarks/bench_core.py --json out/bench_core.json

Measures, as the median over --repeats runs of each loop:
  - allocate + free of 64-block batches (ns per block), kvttl and -- when vLLM
    is importable -- vLLM's own BlockPool on the same operation mix, in the
    same process, interleaved run by run so that machine noise hits both;
  - add_ref + drop_ref of a 64-block batch (a prefix hit and its release);
  - lease grant + release (ns per lease, 16 and 1024 blocks per lease),
    side by side with a pure-Python lease table (a dict, a heapq of
    deadlines and a reference count per block: the least the same work
    takes; it checks nothing, where kvttl validates every id);
  - expire (ns per expired lease) with 1e3 / 1e5 / 1e6 live leases, each call
    expiring about 1% of them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import statistics
import sys
import time

import numpy as np

import kvttl

BATCH = 64


# Each loop returns the nanoseconds its timed part took.

def kvttl_alloc_free(iters):
    pool = kvttl.BlockPool(4096)
    allocate, drop = pool.allocate, pool.drop_ref
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        drop(allocate(BATCH))
    return time.perf_counter_ns() - t0


def kvttl_ref_unref(iters):
    pool = kvttl.BlockPool(4096)
    ids = pool.allocate(BATCH)
    pool.register_hashes(ids, np.arange(BATCH, dtype=np.uint64))
    add, drop = pool.add_ref, pool.drop_ref
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        add(ids)
        drop(ids)
    return time.perf_counter_ns() - t0


def make_vllm_pool():
    """vLLM's BlockPool, or None when vLLM cannot be imported here."""
    try:
        import inspect

        from vllm.v1.core.block_pool import BlockPool as VllmBlockPool
    except Exception:
        return None
    params = inspect.signature(VllmBlockPool.__init__).parameters
    kwargs = {"num_gpu_blocks": 4096, "enable_caching": True}
    if "hash_block_size" in params:
        kwargs["hash_block_size"] = 16
    return VllmBlockPool(**kwargs)


def vllm_alloc_free(iters, pool):
    get, free = pool.get_new_blocks, pool.free_blocks
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        free(get(BATCH))
    return time.perf_counter_ns() - t0


def vllm_ref_unref(iters, pool):
    """touch + free: a prefix hit on 64 blocks and its release."""
    import inspect

    blocks = pool.get_new_blocks(BATCH)
    # vLLM 0.32 takes a flat list; some releases took a tuple of per-group lists.
    flat = "blocks" in inspect.signature(pool.touch).parameters
    arg = blocks if flat else (blocks,)
    touch, free = pool.touch, pool.free_blocks
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        touch(arg)
        free(blocks)
    dt = time.perf_counter_ns() - t0
    free(blocks)
    return dt


def lease_grant_release(iters, blocks_per_lease):
    pool = kvttl.BlockPool(blocks_per_lease + 1)
    ids = pool.allocate(blocks_per_lease)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0)
    grant, release = table.grant, table.release
    t0 = time.perf_counter_ns()
    for i in range(iters):
        grant(i, ids, 30.0, now=0.0)
        release(i)
    return time.perf_counter_ns() - t0


class PythonLeaseTable:
    """The least a lease table must do, in Python: one more reference per
    block on grant and one fewer on release, owner -> lease in a dict, the
    deadline in a heapq. No validation, no cap: a floor for "write it yourself"."""

    def __init__(self, num_blocks):
        self.refs = [1] * num_blocks
        self.leases = {}
        self.heap = []
        self.next_id = 1

    def grant(self, owner, blocks, ttl, now):
        refs = self.refs
        for b in blocks:
            refs[b] += 1
        if owner in self.leases:
            self.release(owner)
        lease_id, self.next_id = self.next_id, self.next_id + 1
        self.leases[owner] = (lease_id, blocks, now + ttl)
        heapq.heappush(self.heap, (now + ttl, lease_id, owner))
        if len(self.heap) > 2 * len(self.leases) + 1024:  # lazy deletion, kept bounded as kvttl's heap is
            self.heap = [e for e in self.heap if self.leases.get(e[2], (0,))[0] == e[1]]
            heapq.heapify(self.heap)
        return lease_id

    def release(self, owner):
        lease = self.leases.pop(owner, None)
        if lease is not None:
            refs = self.refs
            for b in lease[1]:
                refs[b] -= 1
        return lease


def python_grant_release(iters, blocks_per_lease):
    table = PythonLeaseTable(blocks_per_lease + 1)
    ids = list(range(blocks_per_lease))
    grant, release = table.grant, table.release
    t0 = time.perf_counter_ns()
    for i in range(iters):
        grant(i, ids, 30.0, 0.0)
        release(i)
    return time.perf_counter_ns() - t0


def expire_cost(num_leases, rng):
    """ns per expired lease with num_leases live, expiring ~1% per call."""
    pool = kvttl.BlockPool(num_leases)
    ids = pool.allocate(num_leases)
    table = kvttl.LeaseTable(pool, pinned_share_cap=1.0)
    deadlines = rng.uniform(1.0, 2.0, num_leases)
    for i in range(num_leases):
        table.grant(i, ids[i : i + 1], float(deadlines[i]), now=0.0)
    costs = []
    for step in range(1, 6):
        t0 = time.perf_counter_ns()
        expired = table.expire(1.0 + 0.01 * step)
        dt = time.perf_counter_ns() - t0
        if expired:
            costs.append(dt / len(expired))
    table.release_all()
    pool.drop_ref(ids)
    return statistics.median(costs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20000, help="batches per timed loop")
    ap.add_argument("--max-leases", type=float, default=1e6, help="largest live-lease count for expire")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)

    vpool = make_vllm_pool()
    kv_af, kv_rr, v_af, v_rr = [], [], [], []
    for _ in range(args.repeats):
        per_block = args.iters * BATCH
        kv_af.append(kvttl_alloc_free(args.iters) / per_block)
        kv_rr.append(kvttl_ref_unref(args.iters) / per_block)
        if vpool is not None:
            v_af.append(vllm_alloc_free(args.iters, vpool) / per_block)
            v_rr.append(vllm_ref_unref(args.iters, vpool) / per_block)
    med = statistics.median
    out = {
        "kvttl_alloc_free_ns_per_block": med(kv_af),
        "vllm_alloc_free_ns_per_block": med(v_af) if v_af else None,
        "alloc_free_speedup_vs_vllm": med(v_af) / med(kv_af) if v_af else None,
        # ratio per repeat, then the median: both measured back to back
        "alloc_free_speedup_vs_vllm_paired": med([v / k for v, k in zip(v_af, kv_af)]) if v_af else None,
        "kvttl_ref_unref_ns_per_block": med(kv_rr),
        "vllm_ref_unref_ns_per_block": med(v_rr) if v_rr else None,
        "ref_unref_speedup_vs_vllm": med(v_rr) / med(kv_rr) if v_rr else None,
    }
    lease_iters = max(1000, args.iters // 2)
    for blocks in (16, 1024):
        iters = lease_iters if blocks == 16 else max(200, lease_iters // 20)
        ours, python = [], []
        for _ in range(args.repeats):  # interleaved, so noise hits both
            ours.append(lease_grant_release(iters, blocks) / iters)
            python.append(python_grant_release(iters, blocks) / iters)
        out[f"lease_grant_release_ns_{blocks}_blocks"] = med(ours)
        out[f"python_lease_grant_release_ns_{blocks}_blocks"] = med(python)
        out[f"lease_speedup_vs_python_{blocks}_blocks"] = med([p / k for p, k in zip(python, ours)])
    out["lease_grant_release_ns"] = out["lease_grant_release_ns_16_blocks"]
    sizes = [n for n in (1000, 100_000, 1_000_000) if n <= args.max_leases]
    for n in sizes:
        label = {1000: "1e3", 100_000: "1e5", 1_000_000: "1e6"}[n]
        out[f"expire_ns_per_lease_{label}"] = expire_cost(n, rng)
    out.setdefault("expire_ns_per_lease_1e6", None)
    out["config"] = {
        "batch_blocks": BATCH, "repeats": args.repeats, "iters": args.iters,
        "python": sys.version.split()[0], "machine": platform.machine(), "kvttl": kvttl.build_info(),
        "vllm": __import__("vllm").__version__ if vpool is not None else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    for k, v in out.items():
        if k != "config":
            print(f"{k:40s} {v if v is None else round(v, 2)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
