"""report.html: one self-contained page (plots embedded as base64 PNG, no scripts, no network)."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from tokensift.bench.report import (
    accuracy_table,
    aggregate,
    charbench_table,
    flag,
    fmt_interval,
    fmt_len,
    fmt_pct,
    fmt_ratio,
    fmt_score,
    leaderboard_caption,
    leaderboard_cell,
    method_means,
    task_sources,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
td.up { color: #0a7d4f; } td.down { color: #b3261e; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0 1.5em; }
code { background: #f4f4f4; padding: 0 0.2em; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], body: list[list[tuple[str, str]]], left: int = 1) -> str:
    """An HTML table; cells are (text, css class); the first `left` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    head = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    lines = []
    for row in body:
        cells = "".join(
            f'<td class="{cls}{" l" if i < left else ""}">{_e(text)}</td>'
            for i, (text, cls) in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table>{head}<tbody>{''.join(lines)}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{_e(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def _metadata(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    items: list[tuple[str, str]] = []
    if meta:
        model = meta.get("model", {})
        items.append(
            (
                "model",
                f"{model.get('name')} ({model.get('model_type')}, {model.get('layers')} layers, "
                f"{model.get('kv_heads')} KV heads, {model.get('dtype')})",
            )
        )
        runs = meta.get("runs", [])
        if len(runs) > 1:  # a resumed bench appends one entry per invocation: show the last in full
            first = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(runs[0].get("started", 0)))
            commits = sorted({str(r.get("environment", {}).get("commit")) for r in runs})
            items.append(("invocations", f"{len(runs)} (resumed), first started {first}; commits {commits}"))
        for run in runs[-1:]:
            env, config = run.get("environment", {}), run.get("config", {})
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.get("started", 0)))
            label = "last run" if len(runs) > 1 else "run"
            items += [
                (f"{label}: command", env.get("command", "")),
                (f"{label}: started", started),
                (
                    f"{label}: grid",
                    f"suite {config.get('suite')}; seed {config.get('seed')}; samples {config.get('samples')}"
                    f" (per depth: {config.get('depth_samples') or config.get('samples')}); depths "
                    f"{config.get('depths')}; lengths {config.get('lengths')}",
                ),
                (
                    f"{label}: versions",
                    f"tokensift {env.get('tokensift')}, torch {env.get('torch')}, transformers "
                    f"{env.get('transformers')}, python {env.get('python')}; {env.get('threads')} threads "
                    f"on {env.get('machine')}",
                ),
                (f"{label}: commit", str(env.get("commit"))),
            ]
    else:
        items.append(("metadata", "meta.json is missing: only the results are known"))
    seeds = sorted({r["seed"] for r in rows})
    items.append(("rows", f"{len(rows)} results; seeds {seeds}"))
    body = [[(k, "l"), (v, "l")] for k, v in items]
    return _table(["", ""], body, left=2)


def _board_rows(table: dict[str, Any]) -> list[list[tuple[str, str]]]:
    """A leaderboard's rows as table cells, coloured by the sign of the paired difference to dense."""
    body = []
    for fam in table["families"]:
        row = [(fam["family"], "")]
        for ratio in table["ratios"]:
            cell = fam["cells"].get(ratio)
            delta = None if cell is None else cell["delta"]
            cls = "" if not delta else ("up" if delta > 0 else "down")
            row.append((leaderboard_cell(cell), cls))
        body.append(row)
    return body


def write_html(
    path: Path,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    *,
    notes: list[str],
    heatmaps: list[Path],
    pareto: list[Path],
    per_task: list[Path],
    leaderboard: list[tuple[dict[str, Any], Path]] | None = None,
) -> Path:
    """Write the self-contained report: metadata, accuracy with intervals and deltas, plots, costs."""
    acc_rows = []
    for e in accuracy_table(rows):
        scale = e["metric"] == "accuracy"
        delta, cls = "-", ""
        if e["delta"] is not None:
            delta = f"{100 * e['delta']:+.1f}" if scale else f"{e['delta']:+.2f}"
            better = e["delta"] > 0 if scale else e["delta"] < 0
            cls = "" if e["delta"] == 0 else ("up" if better else "down")
        acc_rows.append(
            [
                (e["task"], ""),
                (fmt_len(e["length"]), ""),
                (e["method"] + flag(e), ""),
                (str(e["n"]), ""),
                (fmt_score(e["metric"], e["score"]), ""),
                (fmt_interval(e["ci"]) if scale else "-", ""),
                (delta, cls),
                (fmt_interval(e["delta_ci"]) if scale and e["delta_ci"] else "-", cls),
            ]
        )
    means = [
        [
            (fmt_len(m["length"]), ""),
            (m["method"], ""),
            (str(m["tasks"]), ""),
            (fmt_pct(m["score"]) + "%", ""),
            (fmt_interval(m["ci"]), ""),
        ]
        for m in method_means(rows)
    ]
    costs = [
        [
            (a["task"], ""),
            (a["method"], ""),
            (fmt_len(a["length"]), ""),
            (str(a["n"]), ""),
            (f"{a['kv_ratio']:.3f}", ""),
            (f"{a['kv_mib']:.1f}", ""),
            (f"{a['prefill_seconds']:.2f}", ""),
            (f"{a['decode_tps']:.1f}", ""),
        ]
        for a in aggregate(rows)
    ]
    sources = [[(name, "l"), (text, "l")] for name, text in task_sources(rows).items()]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>tokensift bench report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>tokensift bench report</h1>",
        "<h2>Run</h2>",
        _metadata(meta, rows),
        "<h2>Accuracy per task</h2>",
        '<p class="note">Scores use each benchmark\'s own scorer. 95% intervals: percentile bootstrap over '
        "samples (2000 resamples, seeded). Δ: mean per-sample difference to dense on the same samples, in "
        "points (perplexity: in perplexity; lower is better).</p>",
        _table(
            ["task", "length", "method", "n", "score", "95% CI", "Δ vs dense", "95% CI of Δ"], acc_rows, 3
        ),
        "<h2>Mean over tasks</h2>",
        '<p class="note">Each accuracy task weighted equally (as RULER averages its tasks); interval from a '
        "bootstrap stratified by task.</p>",
        _table(["length", "method", "tasks", "mean accuracy", "95% CI"], means, 2),
    ]
    if leaderboard:
        parts.append("<h2>Leaderboard: accuracy by compression ratio</h2>")
        for table, plot in leaderboard:
            parts += [
                f"<h3>{_e(table['protocol'])}, {_e(fmt_len(table['length']))}</h3>",
                f'<p class="note">{_e(leaderboard_caption(table))}</p>',
                _table(["method"] + [fmt_ratio(r) for r in table["ratios"]], _board_rows(table)),
                _image(plot),
            ]
    if heatmaps:
        parts += ["<h2>Needle depth x length</h2>"] + [_image(p) for p in heatmaps]
    if pareto:
        parts += [
            "<h2>Accuracy vs cost</h2>",
            '<p class="note">One point per method; the grey line joins the Pareto-optimal methods (no other '
            "method is both cheaper and more accurate).</p>",
        ] + [_image(p) for p in pareto]
    parts += [
        "<h2>Memory and speed</h2>",
        '<p class="note">KV held / dense: peak bytes of the K/V tensors the cache held over what a dense '
        "cache holds for the same tokens. Decode tok/s excludes the first token.</p>",
        _table(
            ["task", "method", "length", "n", "KV held / dense", "KV MiB", "prefill s", "decode tok/s"],
            costs,
            2,
        ),
    ]
    parts += [_image(p) for p in per_task]
    features = charbench_table(rows)
    if features:
        parts += [
            "<h2>CharBench by tokenisation</h2>",
            '<p class="note">Accuracy by the queried word\'s number of tokens and by the length of the token '
            "holding the queried position (index tasks), under the evaluated model's tokenizer.</p>",
            _table(
                ["feature", "task", "method", "value", "n", "accuracy"],
                [
                    [
                        (f["feature"], ""),
                        (f["task"], ""),
                        (f["method"], ""),
                        (str(f["value"]), ""),
                        (str(f["n"]), ""),
                        (fmt_pct(f["accuracy"]) + "%", ""),
                    ]
                    for f in features
                ],
                3,
            ),
        ]
    parts += ["<h2>Tasks</h2>", _table(["task", "description and source"], sources, 2)]
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{_e(n)}</li>" for n in notes] + ["</ul>"]
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n")
    return path
