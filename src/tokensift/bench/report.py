"""summary.md and plots from results.jsonl (rebuildable at any time with `tokensift report DIR`)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from tokensift.bench.results import read_rows
from tokensift.errors import TokensiftError


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean(values) if values else float("nan")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (task, method, length): score, KV held vs dense, prefill and decode speed."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    order: list[str] = []
    for row in rows:
        groups[(row["task"], row["method"], row["length"])].append(row)
        if row["method"] not in order:
            order.append(row["method"])
    out = []
    for (task, method, length), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]), kv[0][2])
    ):
        out.append(
            {
                "task": task,
                "metric": group[0]["metric"],
                "method": method,
                "length": length,
                "n": len(group),
                "score": _mean([r["score"] for r in group]),
                "kv_ratio": _mean([r["kv_bytes_peak"] / r["kv_bytes_dense"] for r in group]),
                "kv_mib": _mean([r["kv_bytes_peak"] / 2**20 for r in group]),
                "prefill_seconds": _mean([r["prefill_seconds"] for r in group]),
                "decode_tps": _mean([r.get("decode_tokens_per_second") for r in group]),
                "applied": all(r.get("applied", True) for r in group),
                "notes": sorted({n for r in group for n in r.get("notes", [])}),
            }
        )
    return out


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | method | length | n | score | KV held / dense | KV MiB | prefill s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in aggregate(rows):
        score = f"{100 * a['score']:.1f}%" if a["metric"] == "accuracy" else f"ppl {a['score']:.2f}"
        flag = "" if a["applied"] else " (no-op)"
        lines.append(
            f"| {a['task']} | {a['method']}{flag} | {_fmt_len(a['length'])} | {a['n']} | {score} | "
            f"{a['kv_ratio']:.3f} | {a['kv_mib']:.1f} | {a['prefill_seconds']:.2f} | {a['decode_tps']:.1f} |"
        )
    return "\n".join(lines)


def write_report(directory: Path) -> Path:
    """Write summary.md and the PNG plots next to results.jsonl; returns the summary path."""
    from tokensift.bench.plots import accuracy_vs_memory, depth_heatmaps

    results = directory / "results.jsonl"
    rows = read_rows(results)
    if not rows:
        raise TokensiftError(f"no results in {results}")
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    plots = depth_heatmaps(rows, directory) + accuracy_vs_memory(rows, directory)
    notes = sorted({n for a in aggregate(rows) for n in a["notes"]})
    parts = ["# tokensift bench", ""]
    if meta:
        last = meta["runs"][-1]
        parts += [
            f"- model: `{meta['model']['name']}` ({meta['model']['model_type']}, "
            f"{meta['model']['layers']} layers, "
            f"{meta['model']['kv_heads']} KV heads, {meta['model']['dtype']})",
            f"- command: `{last['environment']['command']}`",
            f"- seed: {last['config']['seed']}; versions: tokensift {last['environment']['tokensift']}, "
            f"torch {last['environment']['torch']}, transformers {last['environment']['transformers']}; "
            f"commit {last['environment']['commit']}",
            "",
        ]
    parts += [
        "Score: accuracy (passkey: first integer equals the key; niah_single: RULER string_match_all) or "
        "perplexity. KV held / dense: peak bytes of the K/V tensors the cache actually held, over what a "
        "dense cache holds for the same tokens. Decode tok/s excludes the first token (it comes from "
        "prefill).",
        "",
        summary_table(rows),
        "",
    ]
    if notes:
        parts += ["Notes (methods that could not apply are marked no-op):", ""]
        parts += [f"- {n}" for n in notes] + [""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    path = directory / "summary.md"
    path.write_text("\n".join(parts) + "\n")
    return path
