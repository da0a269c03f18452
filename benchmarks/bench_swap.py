"""Swap benchmark: GB/s of block transfers, both directions, on a CUDA GPU.

    python benchmarks/bench_swap.py --json out/bench_swap.json

For fragment sizes 4..64 KiB and batches of 1..1024 blocks, on the shapes of
Llama-3.1-8B (32 layers x K,V; 16-token blocks: 32 KiB fragments) and 70B at
TP4 (80 layers x K,V; 8 KiB), it measures side by side in one run: the kvttl
kernel, the batched-memcpy path, the per-fragment cudaMemcpyAsync loop
(what vLLM's swap_blocks does) and one large contiguous pinned copy of the
same bytes (the link ceiling). Median over --repeats. Without a GPU it
writes {"gpu": null, "reason": ...} and exits 0.

Then the grid caps: the kernel launches at most ``max_ctas`` CTAs
(``offload_max_ctas`` for offloads) so that a transfer leaves most SMs to the
model. The sweep measures, for each cap and both directions, the kernel's GB/s
alone and how much longer a bf16 GEMM stream runs while transfers run beside
it (the cost to compute); the batched memcpy, which uses the copy engines and
no SM, is the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import kvttl
import kvttl.errors
from kvttl.swap import HostTier, TransferEngine, cuda_unavailable_reason

SHAPES = {"llama-3.1-8b": 64, "llama-3.1-70b-tp4": 160}  # fragments per block (layers x K,V)
SWEEP_CTAS = (2, 4, 8, 16, 32)
SWEEP_FRAGMENT_KIB = (8, 16, 32)
SWEEP_BATCHES = (64, 256)
FRAGMENT_KIB = (4, 8, 16, 32, 64)
BATCHES = (1, 8, 64, 256, 1024)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-bytes", type=float, default=8e9, help="skip configurations larger than this")
    ap.add_argument("--no-ctas-sweep", action="store_true", help="skip the max_ctas sweep")
    args = ap.parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason:
        out = {"gpu": None, "reason": reason, "build": kvttl.build_info()}
        print(json.dumps(out, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return out
    import torch

    dev = torch.device("cuda")
    header = {"gpu": torch.cuda.get_device_name(), "driver": torch.version.cuda, "build": kvttl.build_info(),
              "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats}
    rows = []
    for shape, fragments in SHAPES.items():
        for kib in FRAGMENT_KIB:
            frag = kib * 1024
            num_blocks = max(BATCHES)
            if fragments * frag * num_blocks > args.max_bytes:
                continue
            layers = [torch.empty((num_blocks, frag), dtype=torch.uint8, device=dev) for _ in range(fragments)]
            for l in layers:
                l.random_(0, 255)
            tier = HostTier.for_layers(layers, num_slots=num_blocks)
            eng = TransferEngine(layers, tier, backend="cuda")
            flat_dev = torch.empty(fragments * frag * num_blocks, dtype=torch.uint8, device=dev)
            flat_host = torch.empty_like(flat_dev, device="cpu").pin_memory()
            for batch in BATCHES:
                ids = list(range(batch))
                nbytes = batch * fragments * frag
                row = {"shape": shape, "fragment_kib": kib, "batch_blocks": batch, "bytes": nbytes}
                for direction in ("to_host", "to_device"):
                    for method in ("kernel", "batched", "loop"):
                        times = []
                        try:
                            for _ in range(args.repeats):
                                torch.cuda.synchronize()
                                t0 = time.perf_counter()
                                h = (eng.offload(ids, ids, method=method) if direction == "to_host"
                                     else eng.reload(ids, ids, method=method))
                                h.wait()
                                times.append(time.perf_counter() - t0)
                        except kvttl.errors.KvttlError as e:  # one path failing must not hide the others
                            row[f"{method}_{direction}_error"] = str(e)
                            row[f"{method}_{direction}_gbps"] = float("nan")
                            continue
                        row[f"{method}_{direction}_gbps"] = nbytes / statistics.median(times) / 1e9
                    times = []
                    for _ in range(args.repeats):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        if direction == "to_host":
                            flat_host[:nbytes].copy_(flat_dev[:nbytes], non_blocking=True)
                        else:
                            flat_dev[:nbytes].copy_(flat_host[:nbytes], non_blocking=True)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    ceiling = nbytes / statistics.median(times) / 1e9
                    row[f"ceiling_{direction}_gbps"] = ceiling
                    row[f"kernel_{direction}_share_of_ceiling"] = row[f"kernel_{direction}_gbps"] / ceiling
                    row[f"kernel_vs_loop_{direction}"] = row[f"kernel_{direction}_gbps"] / row[f"loop_{direction}_gbps"]
                rows.append(row)
                print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                _write(header | {"rows": rows, "complete": False}, args.json)  # a cut-off run keeps its rows
            del layers, eng, tier, flat_dev, flat_host
            torch.cuda.empty_cache()
    out = header | {"rows": rows}
    if not args.no_ctas_sweep:
        out["ctas_sweep"] = []
        for row in ctas_sweep(torch, args.repeats):
            out["ctas_sweep"].append(row)
            _write(out | {"complete": False}, args.json)
    out["complete"] = True
    _write(out, args.json)
    return out


def ctas_sweep(torch, repeats):
    """For each grid cap: kernel GB/s alone, and a GEMM stream's slowdown
    while transfers of the same batch run back to back on another stream."""
    fragments = SHAPES["llama-3.1-8b"]
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    c = torch.empty_like(a)
    compute, copy = torch.cuda.Stream(), torch.cuda.Stream()

    def gemms_ms(n=40):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(compute):
            start.record()
            for _ in range(n):
                torch.mm(a, a, out=c)
            end.record()
        return start, end

    for _ in range(3):
        gemms_ms(5)
    torch.cuda.synchronize()
    alone = []
    for _ in range(repeats):
        s, e = gemms_ms()
        torch.cuda.synchronize()
        alone.append(s.elapsed_time(e))
    gemm_alone_ms = statistics.median(alone)
    for kib in SWEEP_FRAGMENT_KIB:
        frag = kib * 1024
        num_blocks = max(SWEEP_BATCHES)
        layers = [torch.empty((num_blocks, frag), dtype=torch.uint8, device="cuda") for _ in range(fragments)]
        tier = HostTier.for_layers(layers, num_slots=num_blocks)
        # the copy engines (batched memcpy) take no SM: the reference for the kernel's cost
        for method, ctas in [("kernel", c) for c in SWEEP_CTAS] + [("batched", None)]:
            eng = TransferEngine(layers, tier, backend="cuda", max_ctas=ctas or 1, offload_max_ctas=ctas or 1)
            for batch in SWEEP_BATCHES:
                ids = list(range(batch))
                nbytes = batch * fragments * frag
                row = {"shape": "llama-3.1-8b", "fragment_kib": kib, "batch_blocks": batch, "method": method,
                       "max_ctas": ctas, "gemm_alone_ms": gemm_alone_ms}
                for direction in ("to_host", "to_device"):
                    submit = eng.offload if direction == "to_host" else eng.reload
                    times = []
                    for _ in range(repeats):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        submit(ids, ids, method=method).wait()
                        times.append(time.perf_counter() - t0)
                    row[f"{direction}_gbps"] = nbytes / statistics.median(times) / 1e9
                    # contention: the GEMMs are in flight (an engine step), then transfers that
                    # would cover them are issued on a stream of their own
                    count = max(1, int(gemm_alone_ms / 1e3 / (nbytes / row[f"{direction}_gbps"] / 1e9)) + 1)
                    slowdowns, shared_gbps = [], []
                    for _ in range(repeats):
                        torch.cuda.synchronize()
                        s, e = gemms_ms()
                        t0 = time.perf_counter()
                        handles = [submit(ids, ids, stream=copy, method=method) for _ in range(count)]
                        for h in handles:
                            h.wait()
                        copy_s = time.perf_counter() - t0
                        torch.cuda.synchronize()
                        slowdowns.append(s.elapsed_time(e) / gemm_alone_ms)
                        shared_gbps.append(count * nbytes / copy_s / 1e9)
                    row[f"gemm_slowdown_beside_{direction}"] = statistics.median(slowdowns)
                    row[f"{direction}_gbps_beside_gemm"] = statistics.median(shared_gbps)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                yield row
            del eng
        del layers, tier
        torch.cuda.empty_cache()


def _write(out, path):
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
