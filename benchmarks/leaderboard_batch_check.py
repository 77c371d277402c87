"""Does a batched leaderboard cell give the rows the same plans gave one after another?

`--batch-decode` (on in the leaderboard suites since 2026-12-02) decodes a sample's 45 plans in one
batch: one forward per decode step, each plan over its own cache. The linear layers then multiply
45 rows at once instead of one, which may round differently; a greedy token can flip where two
logits nearly tie. This reruns chosen cells of a results directory batched, in a scratch copy, and
compares every row with the committed unbatched row of the same key: prediction, score, tokens
generated, KV bytes held, tokens evicted. A depth-swept task numbers its samples per depth, so a
task:sample:protocol names every depth's sample of that number that has committed rows. It also
sets the batched cell's wall time beside the sum of the committed rows' (different runs: a rough
ratio, not a benchmark).

  python benchmarks/leaderboard_batch_check.py --results benchmarks/results/leaderboard \\
      --cells niah_multivalue:0:query-aware,niah_multivalue:0:query-agnostic,vt:0:query-agnostic,\\
niah_single_3:0:query-agnostic,cwe:0:query-aware \\
      --out benchmarks/results/leaderboard_batch_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tokensift.bench.results import read_rows, row_key
from tokensift.bench.runner import environment, prepare_run, run_cell
from tokensift.bench.suites import get_suite
from tokensift.errors import TokensiftError

COMPARED = ("prediction", "score", "new_tokens", "kv_bytes_peak", "kv_bytes_final", "tokens_evicted")


def parse_cells(text: str) -> list[tuple[str, int, str]]:
    cells = []
    for item in text.split(","):
        try:
            task, index, protocol = item.strip().split(":")
            cells.append((task, int(index), protocol))
        except ValueError:
            raise TokensiftError(
                f"bad cell {item!r}: write task:sample:protocol, e.g. vt:0:query-agnostic"
            ) from None
    return cells


def cell_of(row: dict[str, Any]) -> tuple[str, int, str]:
    return row["task"], row["index"], row.get("protocol") or "query-aware"


def sample_of(row: dict[str, Any]) -> tuple[Any, ...]:
    """A depth-swept task numbers its samples per depth: the depth tells them apart."""
    return (*cell_of(row), row.get("depth"))


def check(results: Path, cells: list[tuple[str, int, str]], suite: str, dtype: str) -> dict[str, Any]:
    rows = read_rows(results / "results.jsonl")
    reference = {row_key(r): r for r in rows if cell_of(r) in cells and r.get("dtype") == dtype}
    for cell in cells:
        if not any(cell_of(r) == cell for r in reference.values()):
            raise TokensiftError(f"{results} has no {dtype} rows of {cell}: run them unbatched first")
    config = get_suite(suite)
    config.dtype, config.batch_decode = dtype, True
    config.tasks = [t for t in config.tasks if t in {c[0] for c in cells}]
    out: dict[str, Any] = {"environment": environment(), "suite": suite, "dtype": dtype, "cells": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "results"
        work.mkdir()
        kept = [r for r in rows if row_key(r) not in reference]
        (work / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        shutil.copy(results / "meta.json", work / "meta.json")
        run = prepare_run(config, work, progress=False)
        done = {sample_of(r) for r in reference.values()}
        for cell in run.cells:
            name = (cell.task.name, cell.sample.index, cell.protocol, cell.sample.depth)
            if name not in done:  # only samples with committed rows to compare with
                continue
            t0 = time.perf_counter()
            batched = list(run_cell(run.model, config, cell, run.plans))
            seconds = time.perf_counter() - t0
            differ, refs = [], []
            for row in batched:
                ref = reference[row_key(row)]
                refs.append(ref)
                diff = {f: [ref.get(f), row.get(f)] for f in COMPARED if ref.get(f) != row.get(f)}
                if diff:
                    differ.append({"method": row["method_spec"], **diff})
            entry = {
                "cell": list(name),
                "rows": len(batched),
                "rows_differing": len(differ),
                "differences": differ,
                "score_batched": sum(r.get("score") or 0 for r in batched),
                "score_reference": sum(r.get("score") or 0 for r in refs),
                "batched_seconds": round(seconds, 1),
                "reference_seconds": round(sum(r["wall_seconds"] for r in refs), 1),
                "decode_steps": max(r.get("decode_batch", {}).get("steps", 0) for r in batched),
            }
            out["cells"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "differences"}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, required=True, help="a results directory with unbatched rows")
    p.add_argument("--cells", required=True, help="task:sample:protocol,... (cells to rerun batched)")
    p.add_argument("--suite", default="leaderboard")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    try:
        result = check(args.results, parse_cells(args.cells), args.suite, args.dtype)
    except TokensiftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    total = sum(c["rows"] for c in result["cells"])
    differing = sum(c["rows_differing"] for c in result["cells"])
    print(f"{differing} of {total} rows differ; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
