"""summary.md, report.html and plots from results.jsonl (rebuildable any time: `tokensift report DIR`)."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np

from tokensift.bench.results import chunk_label, read_meta, read_rows
from tokensift.errors import TokensiftError


def fmt_len(n: int) -> str:
    if n == 0:
        return "-"  # length-free tasks (CharBench)
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean(values) if values else float("nan")


def scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that produced a score (runs a method refused carry an `error` instead)."""
    return [r for r in rows if not r.get("error")]


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """One note per (task, method, error message) of the runs that failed."""
    groups: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        if r.get("error"):
            groups[(r["task"], r["method"], r["error"])] += 1
    return [f"{t} under {m}: {n} run(s) failed: {e}" for (t, m, e), n in groups.items()]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (task, method, length): score, KV held vs dense, prefill and decode speed."""
    rows = scored(rows)
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
                "no_op": no_op(group),
            }
        )
    return out


def flag(entry: dict[str, Any]) -> str:
    """What follows the method's name in a table row: why it changed nothing, if it did not."""
    return f" ({entry['no_op']})" if entry["no_op"] else ""


def no_op(group: list[dict[str, Any]]) -> str:
    """Why rows of a group did not apply their method ("" when every row did): the share of rows and
    their notes, so a table row says why it is marked."""
    idle = [r for r in group if not r.get("applied", True)]
    if not idle:
        return ""
    share = "" if len(idle) == len(group) else f" in {len(idle)} of {len(group)} runs"
    reasons = "; ".join(sorted({n for r in idle for n in r.get("notes", [])})) or "no note recorded"
    return f"no-op{share}: {reasons}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | method | length | n | score | KV held / dense | KV MiB | prefill s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in aggregate(rows):
        score = f"{100 * a['score']:.1f}%" if a["metric"] == "accuracy" else f"ppl {a['score']:.2f}"
        lines.append(
            f"| {a['task']} | {a['method']}{flag(a)} | {fmt_len(a['length'])} | {a['n']} | {score} | "
            f"{a['kv_ratio']:.3f} | {a['kv_mib']:.1f} | {a['prefill_seconds']:.2f} | {a['decode_tps']:.1f} |"
        )
    return "\n".join(lines)


def bootstrap_ci(values: list[float], rng: np.random.Generator, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded: the same rows give the same interval)."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    data = np.asarray(values, dtype=float)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _sample_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["model"], row["task"], row["length"], row.get("depth"), row["index"], row["seed"])


def accuracy_table(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Per (task, length, method): mean score with a bootstrap 95% interval, and the paired difference
    to dense on the same samples with its own interval (None where the run has no dense rows)."""
    rows = scored(rows)
    rng = np.random.default_rng(seed)
    dense = {_sample_key(r): r["score"] for r in rows if r.get("method_spec", r["method"]) == "dense"}
    out = []
    for a in aggregate(rows):
        group = [
            r for r in rows if (r["task"], r["method"], r["length"]) == (a["task"], a["method"], a["length"])
        ]
        scores = [r["score"] for r in group]
        lo, hi = bootstrap_ci(scores, rng)
        pairs = [(r["score"], dense[_sample_key(r)]) for r in group if _sample_key(r) in dense]
        entry = {**a, "ci": (lo, hi), "delta": None, "delta_ci": None, "paired": len(pairs)}
        if pairs and a["method"] != "dense":
            diffs = [x - d for x, d in pairs]
            entry["delta"] = mean(diffs)
            entry["delta_ci"] = bootstrap_ci(diffs, rng)
        out.append(entry)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(out, key=lambda e: (e["task"], e["length"], methods.index(e["method"])))


def common_samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the samples that every method of their length has a score for, so averages over
    tasks compare methods on the same samples (a run still in progress, or a refused run, leaves gaps)."""
    methods: dict[int, set[str]] = defaultdict(set)
    have: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    for r in rows:
        methods[r["length"]].add(r["method"])
        have[_sample_key(r)].add(r["method"])
    return [r for r in rows if have[_sample_key(r)] == methods[r["length"]]]


RESAMPLES = 2000


def _stratified(
    per_task: dict[str, np.ndarray], draws: dict[str, np.ndarray]
) -> tuple[float, tuple[float, float]]:
    """Mean over tasks of the per-task means, and its percentile bootstrap 95% interval with samples
    resampled within each task by the shared `draws` (no interval when a task has a single sample)."""
    value = float(np.mean([v.mean() for v in per_task.values()]))
    if min(len(v) for v in per_task.values()) < 2:
        return value, (float("nan"), float("nan"))
    boot = np.mean([per_task[t][draws[t]].mean(axis=1) for t in per_task], axis=0)
    return value, (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))


def method_means(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """RULER-style average: per (method, length), the mean of the per-task accuracies over the samples
    every method has, with a stratified bootstrap interval (samples resampled within each task; none
    when a task has a single sample)."""
    rows = common_samples(scored(rows))
    rng = np.random.default_rng(seed)
    acc = [r for r in rows if r["metric"] == "accuracy"]
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for r in acc:
        cells[(r["method"], r["length"])][r["task"]].append(r["score"])
        if r["method"] not in order:
            order.append(r["method"])
    out = []
    for (method, length), per_task in sorted(cells.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        draws = {t: rng.integers(0, len(v), size=(RESAMPLES, len(v))) for t, v in per_task.items()}
        score, ci = _stratified({t: np.asarray(v, dtype=float) for t, v in per_task.items()}, draws)
        out.append({"method": method, "length": length, "tasks": len(per_task), "score": score, "ci": ci})
    return out


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def fmt_interval(ci: tuple[float, float] | None) -> str:
    if ci is None or ci[0] != ci[0]:
        return "-"
    return f"[{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]"


def fmt_score(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"ppl {value:.2f}"


def accuracy_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | length | method | n | score | 95% CI | Δ vs dense | 95% CI of Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in accuracy_table(rows):
        scale = e["metric"] == "accuracy"
        ci = fmt_interval(e["ci"]) if scale else "-"
        delta = "-" if e["delta"] is None else (f"{100 * e['delta']:+.1f}" if scale else f"{e['delta']:+.2f}")
        dci = fmt_interval(e["delta_ci"]) if scale and e["delta_ci"] else "-"
        lines.append(
            f"| {e['task']} | {fmt_len(e['length'])} | {e['method']}{flag(e)} | {e['n']} | "
            f"{fmt_score(e['metric'], e['score'])} | {ci} | {delta} | {dci} |"
        )
    return "\n".join(lines)


def method_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| length | method | tasks | mean accuracy | 95% CI |", "|---|---|---|---|---|"]
    for m in method_means(rows):
        lines.append(
            f"| {fmt_len(m['length'])} | {m['method']} | {m['tasks']} | {fmt_pct(m['score'])}% | "
            f"{fmt_interval(m['ci'])} |"
        )
    return "\n".join(lines)


# The compact leaderboard (kvpress's layout): a row per method family, a column per compression ratio.

PROTOCOL_ORDER = ("query-aware", "query-agnostic")


@functools.cache
def plan_compression(spec: str) -> tuple[str, str, float] | None:
    """(family, variant, compression ratio) of a plan, from its parsed method spec: ("dense", "", 0.0)
    for the full cache; for one method at a fractional budget (an evictor, or a wrapper such as
    adaptive(snapkv)), its name, its other parameters and the fraction removed, 1 - budget. None for
    anything else: token budgets, compositions, specs this version no longer parses."""
    from tokensift.runtime.plan import Plan

    try:
        plan = Plan.of(spec)
    except (TokensiftError, ValueError, TypeError):
        return None
    if plan.is_dense:
        return ("dense", "", 0.0)
    if len(plan.methods) != 1:
        return None
    method = plan.methods[0]
    budget = getattr(method, "budget", None)
    if not isinstance(budget, float) or not 0.0 < budget < 1.0:
        return None
    inner = getattr(method, "method", None) if getattr(method, "wraps", False) else None
    params = {k: v for k, v in method.params().items() if k != "budget"}
    family = method.name
    if inner is not None:
        family = f"{method.name}({inner.name})"
        params |= {k: v for k, v in inner.params().items() if k != "budget"}
    variant = ",".join(f"{k}={v}" for k, v in params.items())
    return family, variant, round(1.0 - budget, 6)


def leaderboard_tables(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Per protocol and length with compressing plans at two or more ratios: the mean accuracy over tasks
    (each task weighted equally) of every method family at every compression ratio, with a stratified
    bootstrap 95% interval and the paired difference to dense, on the samples that every plan of the
    protocol has a score for (`common_samples`), so a run still in progress compares like with like."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    kinds: dict[str, tuple[str, str, float]] = {}
    for r in scored(rows):
        if r["metric"] != "accuracy" or r["length"] <= 0:
            continue
        kind = plan_compression(r.get("method_spec") or r["method"])
        if kind is None:
            continue
        kinds[r["method"]] = kind
        groups[(r.get("protocol") or "query-aware", r["length"])].append(r)

    def protocol_rank(key: tuple[str, int]) -> tuple[int, str, int]:
        protocol, length = key
        rank = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
        return rank, protocol, length

    out = []
    for (protocol, length), group in sorted(groups.items(), key=lambda kv: protocol_rank(kv[0])):
        ratios = sorted({kinds[r["method"]][2] for r in group if kinds[r["method"]][0] != "dense"})
        if len(ratios) < 2:
            continue
        out.append(_leaderboard(protocol, length, group, kinds, ratios, seed))
    return out


def _leaderboard(
    protocol: str,
    length: int,
    group: list[dict[str, Any]],
    kinds: dict[str, tuple[str, str, float]],
    ratios: list[float],
    seed: int,
) -> dict[str, Any]:
    kept = common_samples(group)
    all_tasks = list(dict.fromkeys(r["task"] for r in group))
    samples: dict[str, list[tuple[Any, ...]]] = {}
    for r in kept:
        samples.setdefault(r["task"], [])
        if _sample_key(r) not in samples[r["task"]]:
            samples[r["task"]].append(_sample_key(r))
    for keys in samples.values():
        keys.sort(key=repr)
    position = {key: i for keys in samples.values() for i, key in enumerate(keys)}
    # A family's display name: its name, with its other parameters where two variants share the name.
    variants: dict[str, set[str]] = defaultdict(set)
    for family, variant, _ in kinds.values():
        variants[family].add(variant)

    def name_of(row: dict[str, Any]) -> str:
        family, variant, _ = kinds[row["method"]]
        name = f"{family} ({variant})" if len(variants[family]) > 1 else family
        return name + chunk_label(row.get("prefill_chunk") or 0, row.get("prefill_lookahead") or 0)

    scores: dict[tuple[str, float], dict[str, np.ndarray]] = {}
    order: list[str] = []
    for r in kept:
        name, ratio = name_of(r), kinds[r["method"]][2]
        if name not in order:
            order.append(name)
        cell = scores.setdefault((name, ratio), {t: np.full(len(k), np.nan) for t, k in samples.items()})
        cell[r["task"]][position[_sample_key(r)]] = r["score"]
    # Dense first, then the leaderboard suite's order of evictors, then any other family as written.
    from tokensift.bench.suites import LEADERBOARD_EVICTORS

    known = ["dense", *LEADERBOARD_EVICTORS]
    order.sort(key=lambda name: known.index(name) if name in known else len(known))
    rng = np.random.default_rng(seed)
    draws = {t: rng.integers(0, len(k), size=(RESAMPLES, len(k))) for t, k in samples.items()}
    dense = next((v for (name, _), v in scores.items() if name == "dense"), None)
    families = []
    for name in order:
        cells = {}
        for (cell_name, ratio), per_task in scores.items():
            if cell_name != name:
                continue
            score, ci = _stratified(per_task, draws)
            cell = {"score": score, "ci": ci, "delta": None, "delta_ci": None}
            if dense is not None and name != "dense":
                cell["delta"], cell["delta_ci"] = _stratified(
                    {t: per_task[t] - dense[t] for t in per_task}, draws
                )
            cells[ratio] = cell
        families.append({"family": name, "cells": cells})
    return {
        "protocol": protocol,
        "length": length,
        "ratios": ([0.0] if dense is not None else []) + ratios,
        "tasks": {t: len(k) for t, k in samples.items()},
        "unfinished_tasks": [t for t in all_tasks if t not in samples],
        "plans": len({r["method"] for r in group}),
        "families": families,
        "removes": ratio_meaning(r.get("method_spec") or r["method"] for r in group),
    }


def ratio_meaning(specs: Iterable[str]) -> str:
    """What a compression ratio is a fraction of, for these plans: the KV cache (evictors remove it) or
    the prompt (a sparse decoder attends to part of it each step and keeps the whole cache)."""
    from tokensift.methods.base import Hook
    from tokensift.runtime.plan import Plan

    meanings = set()
    for spec in set(specs):
        plan = Plan.of(spec)
        if not plan.is_dense:
            selects = any(Hook.SELECT in m.hooks for m in plan.methods)
            meanings.add("of the prompt not attended" if selects else "of the KV cache removed")
    return "fraction " + " or ".join(sorted(meanings))  # a leaderboard has compressing plans


def fmt_ratio(ratio: float) -> str:
    return "0 (dense)" if ratio == 0 else f"{ratio:g}"


def leaderboard_cell(cell: dict[str, Any] | None) -> str:
    """`mean [95% CI], Δ diff [95% CI]` in points; intervals left out where there is none."""
    if cell is None:
        return "-"
    text = fmt_pct(cell["score"])
    if cell["ci"][0] == cell["ci"][0]:
        text += f" {fmt_interval(cell['ci'])}"
    if cell["delta"] is not None:
        text += f", Δ {100 * cell['delta']:+.1f}"
        if cell["delta_ci"][0] == cell["delta_ci"][0]:
            text += f" {fmt_interval(cell['delta_ci'])}"
    return text


def samples_span(table: dict[str, Any]) -> str:
    """Samples per task of a leaderboard table: "2", or "1-2" where tasks differ."""
    counts = sorted(set(table["tasks"].values()))
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def leaderboard_caption(table: dict[str, Any]) -> str:
    """What a leaderboard table averages over: protocol, tasks, samples per task, plans, intervals."""
    n = table["tasks"]
    text = (
        f"{table['protocol']} protocol, {fmt_len(table['length'])} tokens: mean accuracy (%) over "
        f"{len(n)} tasks, each weighted equally (as RULER averages), at each compression ratio "
        "(1 - budget: the fraction of the KV cache removed; for sparse decoding, of the prompt not "
        f"attended), on the samples that all {table['plans']} plans of this protocol finished: "
        f"{samples_span(table)} samples per task ({', '.join(f'{t} {k}' for t, k in n.items())})."
    )
    if table["unfinished_tasks"]:
        text += f" Left out (no sample finished by every plan yet): {', '.join(table['unfinished_tasks'])}."
    return text + (
        f" 95% CI: percentile bootstrap over samples stratified by task ({RESAMPLES} resamples, "
        "seeded; none while a task has a single sample). Δ: paired difference to dense on the same "
        "samples, in points."
    )


def leaderboard_markdown(table: dict[str, Any]) -> str:
    ratios = table["ratios"]
    lines = [
        "| method | " + " | ".join(fmt_ratio(r) for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for f in table["families"]:
        cells = [leaderboard_cell(f["cells"].get(r)) for r in ratios]
        lines.append(f"| {f['family']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def charbench_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CharBench accuracy by the queried word's token count (and by the length of the token holding the
    queried position), per task and method: the paper's tokenisation analysis in table form."""
    rows = scored(rows)
    out = []
    feats = [r for r in rows if isinstance(r.get("features"), dict)]
    for feature in ("n_tokens", "target_token_length"):
        groups: dict[tuple[str, str, Any], list[float]] = defaultdict(list)
        for r in feats:
            value = r["features"].get(feature)
            if value is not None:
                groups[(r["task"], r["method"], value)].append(r["score"])
        for (task, method, value), scores in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
        ):
            out.append(
                {
                    "feature": feature,
                    "task": task,
                    "method": method,
                    "value": value,
                    "n": len(scores),
                    "accuracy": mean(scores),
                }
            )
    return out


def run_metadata(directory: Path) -> dict[str, Any]:
    return read_meta(directory / "meta.json")


def task_sources(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each task's origin and substitutions, from the task registry (tasks no longer known: blank)."""
    from tokensift.bench.tasks import get_task

    out = {}
    for name in dict.fromkeys(r["task"] for r in rows):
        try:
            task = get_task(name)
        except TokensiftError:
            out[name] = ""
            continue
        out[name] = f"{task.description}. Source: {task.source}" if task.source else task.description
    return out


def write_report(directory: Path) -> Path:
    """Write summary.md, report.html and the PNG plots next to results.jsonl; returns the summary path."""
    from tokensift.bench.html_report import write_html
    from tokensift.bench.plots import accuracy_vs_memory, depth_heatmaps, leaderboard_plots, pareto_plot

    results = directory / "results.jsonl"
    if not results.is_file():
        raise TokensiftError(
            f"{directory} has no results.jsonl: run `tokensift bench --out {directory}` first"
        )
    every = read_rows(results)
    rows = scored(every)
    if not rows:
        what = f"all {len(every)} runs failed" if every else "it is empty"
        raise TokensiftError(
            f"no scored results in {results} ({what}): run `tokensift bench --out {directory}`"
        )
    meta = run_metadata(directory)
    heatmaps = depth_heatmaps(rows, directory)
    pareto = pareto_plot(rows, directory, "kv") + pareto_plot(rows, directory, "latency")
    per_task = accuracy_vs_memory(rows, directory)
    boards = leaderboard_tables(rows)
    board_plots = leaderboard_plots(boards, directory)
    notes = failures(every) + sorted({n for a in aggregate(rows) for n in a["notes"]})
    parts = ["# tokensift bench", ""]
    if meta.get("runs") and meta.get("model"):
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
        "Score: accuracy with each benchmark's own scorer (RULER string_match_all, InfiniteBench/LongBench "
        "number matching, exact match for Needle Threading and CharBench) or perplexity. KV held / dense: "
        "peak bytes of the K/V tensors the cache actually held, over what a dense cache holds for the "
        "same tokens. Decode tok/s excludes the first token (it comes from prefill).",
        "",
        summary_table(rows),
        "",
        "## Accuracy with bootstrap 95% intervals and paired differences to dense",
        "",
        "Δ is the mean per-sample difference to dense on the same samples, in points.",
        "",
        accuracy_markdown(rows),
        "",
        "## Mean over tasks (each task weighted equally, as RULER averages)",
        "",
        method_markdown(rows),
        "",
    ]
    if boards:
        parts += ["## Leaderboard: accuracy by compression ratio", ""]
        for table, plot in zip(boards, board_plots, strict=True):
            parts += [
                f"### {table['protocol']}, {fmt_len(table['length'])}",
                "",
                leaderboard_caption(table),
                "",
                leaderboard_markdown(table),
                "",
                f"![{plot.stem}]({plot.name})",
                "",
            ]
    parts += ["## Tasks", ""]
    parts += [f"- `{name}`: {text}" for name, text in task_sources(rows).items()] + [""]
    if notes:
        parts += ["Notes (rows whose method changed nothing are marked no-op, with the reason):", ""]
        parts += [f"- {n}" for n in notes] + [""]
    parts += [f"![{p.stem}]({p.name})" for p in heatmaps + pareto + per_task]
    path = directory / "summary.md"
    path.write_text("\n".join(parts) + "\n")
    write_html(
        directory / "report.html",
        rows,
        meta,
        notes=notes,
        heatmaps=heatmaps,
        pareto=pareto,
        per_task=per_task,
        leaderboard=list(zip(boards, board_plots, strict=True)),
    )
    return path
