"""Swap benchmark: GB/s of block transfers, both directions, on a CUDA GPU.

    python benchmarks/bench_swap.py --json out/bench_swap.json

For fragment sizes 4..64 KiB and batches of 1..1024 blocks, on the shapes of
Llama-3.1-8B (32 layers x K,V; 16-token blocks: 32 KiB fragments) and 70B at
TP4 (80 layers x K,V; 8 KiB), it measures side by side in one run: the kvttl
kernel, the batched-memcpy path, the per-fragment cudaMemcpyAsync loop
(what vLLM's swap_blocks does) and one large contiguous pinned copy of the
same bytes (the link ceiling). Median over --repeats. Without a GPU it
writes {"gpu": null, "reason": ...} and exits 0.
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
FRAGMENT_KIB = (4, 8, 16, 32, 64)
BATCHES = (1, 8, 64, 256, 1024)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-bytes", type=float, default=8e9, help="skip configurations larger than this")
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
    out = header | {"rows": rows, "complete": True}
    _write(out, args.json)
    return out


def _write(out, path):
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
