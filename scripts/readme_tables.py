"""The README's simulator table, generated from ``kvttl simulate --json``.

    kvttl simulate --policies vllm,vllm-lmcache,continuum,kvttl,oracle --json out.json
    python scripts/readme_tables.py out.json              # prints the table
    python scripts/readme_tables.py out.json --write README.md

``--write`` replaces what lies between the README's markers
``<!-- simulate-table -->`` and ``<!-- /simulate-table -->``; the test suite
checks that the README holds what the current code produces, so a number in
it is never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: (column title, policy) of the table; ratios follow
COLUMNS = ("vllm", "vllm-lmcache", "continuum", "kvttl", "oracle")
#: the command whose --json the README's table is made of
COMMAND = ["simulate", "--policies", ",".join(COLUMNS), "--quiet"]
BEGIN, END = "<!-- simulate-table -->", "<!-- /simulate-table -->"


def table(report: dict) -> str:
    rows = report["results"]
    cfg = report["config"]
    means = {(r["policy"], r["jps"]): r["mean_jct_s"] for r in rows}
    head = ["jps", *COLUMNS, "continuum vs vllm", "kvttl vs best other", "kvttl JCT / oracle JCT"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for jps in cfg["loads"]:
        cells = [f"{jps:g}"] + [f"{means[p, jps]:.1f} s" for p in COLUMNS]
        others = min(means[p, jps] for p in COLUMNS if p not in ("kvttl", "oracle"))
        cells += [f"{means['vllm', jps] / means['continuum', jps]:.2f}×",
                  f"{others / means['kvttl', jps]:.2f}×",
                  f"{means['kvttl', jps] / means['oracle', jps]:.2f}×"]
        lines.append(f"| {' | '.join(cells)} |")
    top = max(cfg["loads"])
    buckets = {(b["policy"], b["turns"]): b["speedup_vs_baseline"] for b in report["by_turns"] if b["jps"] == top}
    spans = list(dict.fromkeys(b["turns"] for b in report["by_turns"]))
    lines.append("")
    lines.append(f"Mean JCT speedup over `{cfg['baseline']}` by turns per program, at {top:g} jps:")
    lines.append("")
    lines.append(f"| policy | {' | '.join(s + ' turns' for s in spans)} |")
    lines.append("|---|" + "---|" * len(spans))
    for p in COLUMNS:
        lines.append(f"| `{p}` | " + " | ".join(f"{buckets[p, s]:.2f}×" for s in spans) + " |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"readme_tables: no {BEGIN} ... {END} block to replace")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text, count=1)


def current_block(text: str) -> str | None:
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    return match.group(1) if match else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a kvttl simulate --json output")
    ap.add_argument("--write", metavar="README", help="replace the table block in this file")
    args = ap.parse_args(argv)
    block = table(json.loads(Path(args.report).read_text()))
    if args.write:
        path = Path(args.write)
        path.write_text(replace_block(path.read_text(), block))
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
