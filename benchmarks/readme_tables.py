"""Print the README's bench tables from a committed results folder, so no figure is typed by hand.

    python benchmarks/readme_tables.py demo benchmarks/results/demo
    python benchmarks/readme_tables.py ruler-lite benchmarks/results/ruler_lite \
        [--heatmap docs/ruler_lite_niah_heatmap.png]

The folder holds the `results.jsonl` and `meta.json` a `tokensift bench --out DIR` run wrote. `demo`
prints the per-cell cost table of `tokensift report` (summary.md's first table); `ruler-lite` prints the
mean over tasks (each task weighted equally, stratified bootstrap 95% interval, as in summary.md) with
the mean KV held / dense of each (length, method). `--heatmap PATH` redraws the depth x length heatmap
averaging every depth-swept task (the report's `niah_all_heatmap.png`) to PATH. Nothing is written
into the results folder; a line naming the run goes to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import mean

from tokensift.bench.report import (
    aggregate,
    fmt_interval,
    fmt_len,
    fmt_pct,
    method_means,
    scored,
    summary_table,
)
from tokensift.bench.results import read_meta, read_rows


def header(directory: Path, rows: list[dict]) -> str:
    """One line naming the model, dtype(s), rows and the command of the run."""
    meta = read_meta(directory / "meta.json")
    dtypes = sorted({r.get("dtype", "float32") for r in rows})
    commands = [run["environment"]["command"] for run in meta.get("runs", [])]
    return (
        f"{directory}: {meta.get('model', {}).get('name', '?')}, dtype {', '.join(dtypes)}, "
        f"{len(rows)} scored rows; command(s): {' | '.join(commands)}"
    )


def ruler_table(rows: list[dict]) -> str:
    kv: dict[tuple[str, int], list[float]] = defaultdict(list)
    for a in aggregate(rows):
        kv[(a["method"], a["length"])].append(a["kv_ratio"])
    n: dict[tuple[str, int], int] = defaultdict(int)
    for r in scored(rows):
        n[(r["method"], r["length"])] += 1
    lines = [
        "| length | method | tasks | runs | mean accuracy | 95% CI | KV held / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in method_means(rows):
        key = (m["method"], m["length"])
        lines.append(
            f"| {fmt_len(m['length'])} | {m['method']} | {m['tasks']} | {n[key]} | {fmt_pct(m['score'])}% | "
            f"{fmt_interval(m['ci'])} | {mean(kv[key]):.2f} |"
        )
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Path) -> None:
    from tokensift.bench.plots import depth_heatmaps

    with tempfile.TemporaryDirectory() as tmp:
        made = depth_heatmaps(scored(rows), Path(tmp))
        if not made:
            raise SystemExit("no depth-swept accuracy rows: no heatmap")
        shutil.copyfile(made[0], path)  # the first is the average over all depth-swept tasks
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["demo", "ruler-lite"])
    parser.add_argument("dir", type=Path, help="folder with results.jsonl and meta.json")
    parser.add_argument("--heatmap", type=Path, help="also redraw the NIAH heatmap to this PNG")
    args = parser.parse_args()
    rows = scored(read_rows(args.dir / "results.jsonl"))
    print(header(args.dir, rows), file=sys.stderr)
    print(summary_table(rows) if args.table == "demo" else ruler_table(rows))
    if args.heatmap:
        heatmap(rows, args.heatmap)


if __name__ == "__main__":
    main()
