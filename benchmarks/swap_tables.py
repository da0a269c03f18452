"""Markdown tables from a ``bench_swap.py --json`` output, for benchmarks/README.md.

    python benchmarks/swap_tables.py benchmarks/results/2026-12-06-h100/bench_swap_warp_per_fragment.json

Prints the transfer table (the rows the README shows; ``--all`` for every
row) and, when the run has one, the grid-cap sweep.
"""

from __future__ import annotations

import argparse
import json

#: (shape, fragment KiB, blocks) rows the README shows
SHOWN = [("llama-3.1-8b", 4, 1024), ("llama-3.1-8b", 8, 1), ("llama-3.1-8b", 8, 64), ("llama-3.1-8b", 8, 256),
         ("llama-3.1-8b", 8, 1024), ("llama-3.1-8b", 32, 1), ("llama-3.1-8b", 32, 64), ("llama-3.1-8b", 32, 1024),
         ("llama-3.1-70b-tp4", 8, 64), ("llama-3.1-70b-tp4", 8, 256), ("llama-3.1-70b-tp4", 8, 1024),
         ("llama-3.1-70b-tp4", 32, 64)]


def transfer_table(rows, every=False) -> str:
    head = ["shape", "fragment", "blocks", "kernel → host GB/s (share of ceiling)", "kernel → device",
            "batched → host", "batched → device", "loop → host", "kernel ÷ loop (→ host, → device)"]
    out = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    by_key = {(r["shape"], r["fragment_kib"], r["batch_blocks"]): r for r in rows}
    for key in (by_key if every else [k for k in SHOWN if k in by_key]):
        r = by_key[key]
        out.append("| " + " | ".join([
            r["shape"], f"{r['fragment_kib']} KiB", str(r["batch_blocks"]),
            f"{r['kernel_to_host_gbps']:.1f} ({r['kernel_to_host_share_of_ceiling']:.0%})",
            f"{r['kernel_to_device_gbps']:.1f} ({r['kernel_to_device_share_of_ceiling']:.0%})",
            f"{r['batched_to_host_gbps']:.1f}", f"{r['batched_to_device_gbps']:.1f}", f"{r['loop_to_host_gbps']:.1f}",
            f"{r['kernel_vs_loop_to_host']:.1f}× / {r['kernel_vs_loop_to_device']:.1f}×"]) + " |")
    return "\n".join(out)


def sweep_table(rows, blocks=None) -> str:
    head = ["fragment", "blocks", "path (grid cap)", "→ host GB/s", "GEMM time beside it", "→ device GB/s",
            "GEMM time beside it"]
    out = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else "–"

    for r in rows:
        if blocks is not None and r["batch_blocks"] != blocks:
            continue
        r = {"gemm_slowdown_beside_to_host": r.get("gemm_slowdown_with_transfers")} | r  # the first sweep's name
        out.append("| " + " | ".join([
            f"{r['fragment_kib']} KiB", str(r["batch_blocks"]),
            f"kernel ({r['max_ctas']})" if r.get("method", "kernel") == "kernel" else r["method"],
            cell(r, "to_host_gbps", "{:.1f}"), cell(r, "gemm_slowdown_beside_to_host", "{:.2f}×"),
            cell(r, "to_device_gbps", "{:.1f}"), cell(r, "gemm_slowdown_beside_to_device", "{:.2f}×")]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a bench_swap.py --json output")
    ap.add_argument("--all", action="store_true", help="every row of the transfer table")
    ap.add_argument("--sweep-blocks", type=int, help="only the sweep's rows of this batch size")
    args = ap.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    if report.get("gpu") is None:
        print(f"no GPU in this run: {report.get('reason')}")
        return 1
    print(f"{report['gpu']}, CUDA {report['driver']}, {report['date']}, median of {report['repeats']}\n")
    print(transfer_table(report["rows"], args.all))
    if report.get("ctas_sweep"):
        print()
        print(sweep_table(report["ctas_sweep"], args.sweep_blocks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
